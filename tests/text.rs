//! The caption tokenizer.

use tessera::Error;
use tessera::text::{TextTokenizer, bootstrap_corpus};

fn tok() -> TextTokenizer {
    TextTokenizer::train(bootstrap_corpus().iter(), 600).unwrap()
}

#[test]
fn lowercases_and_round_trips() {
    let t = tok();
    assert!(t.vocab_size() <= 600 && t.vocab_size() > 256);
    let a = t.encode("A Small RED Circle", 64).unwrap();
    let b = t.encode("a small red circle", 64).unwrap();
    assert_eq!(a, b);
    assert_eq!(t.decode(&a.ids).unwrap().trim(), "a small red circle");
    // merges were learned: common words take fewer tokens than letters
    assert!(a.ids.len() < "a small red circle".len() / 2, "{:?}", a.ids);
}

#[test]
fn truncation_is_reported() {
    let t = tok();
    let e = t.encode("a red circle above a green square left of a blue star", 4).unwrap();
    assert_eq!(e.ids.len(), 4);
    assert!(e.truncated() && e.full_len > 4);
    assert!(!t.encode("red", 4).unwrap().truncated());
    assert!(matches!(t.encode("", 4), Err(Error::EmptyPrompt)));
    // unseen characters still encode (byte level)
    assert!(!t.encode("ünïcødé ☃", 64).unwrap().ids.is_empty());
}

#[test]
fn save_load_and_dropout() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    t.save(&p).unwrap();
    let u = TextTokenizer::load(&p).unwrap();
    let s = "a large navy octagon below a small olive heart";
    assert_eq!(t.encode(s, 64).unwrap(), u.encode(s, 64).unwrap());
    let d = u.with_dropout(0.5).unwrap();
    let plain = d.encode(s, 64).unwrap();
    let mut differs = false;
    for _ in 0..20 {
        let e = d.encode_train(s, 64).unwrap();
        assert_eq!(d.decode(&e.ids).unwrap().trim(), s);
        differs |= e.ids != plain.ids;
    }
    assert!(differs, "BPE dropout never changed the segmentation");
    std::fs::write(&p, "{ broken").unwrap();
    assert!(TextTokenizer::load(&p).is_err());
}
