//! Each attention mask against a brute-force definition of its pattern.

use tch::{Device, Kind};
use tessera::AttentionKind;
use tessera::attention::{StreamShape, build_mask};

/// What a query at stream position `q` may see, written from the paper's words: text is
/// causal; an image token sees all text, and among image tokens the layer's pattern.
#[allow(clippy::needless_range_loop)] // written as index loops on purpose: a second, plain definition
fn brute_force(kind: AttentionKind, s: StreamShape) -> Vec<Vec<bool>> {
    let (t, w) = (s.text_len, s.grid);
    let l = s.seq_len();
    let mut m = vec![vec![false; l]; l];
    for q in 0..l {
        if q <= t {
            for k in 0..=q {
                m[q][k] = true;
            }
            continue;
        }
        for k in 0..=t {
            m[q][k] = true;
        }
        let j = q - t - 1; // image token held at q
        let (row, col) = (j / w, j % w);
        let mut keys: Vec<usize> = Vec::new();
        match kind {
            AttentionKind::Full => keys.extend(0..=j),
            // itself and the previous W tokens in raster order
            AttentionKind::Row => keys.extend(j.saturating_sub(w)..=j),
            // the same column in this and every earlier row
            AttentionKind::Column => keys.extend((0..=row).map(|r| r * w + col)),
            // the causal part of a k×k window centred on the token
            AttentionKind::Conv => {
                let r = (s.conv_kernel / 2) as i64;
                for dr in -r..=r {
                    for dc in -r..=r {
                        let (rr, cc) = (row as i64 + dr, col as i64 + dc);
                        if rr < 0 || cc < 0 || rr >= w as i64 || cc >= w as i64 {
                            continue;
                        }
                        let k = rr as usize * w + cc as usize;
                        if k <= j {
                            keys.push(k);
                        }
                    }
                }
            }
        }
        for k in keys {
            m[q][t + 1 + k] = true;
        }
    }
    m
}

fn check(kind: AttentionKind, s: StreamShape) {
    let fast = build_mask(kind, s, Device::Cpu).to_kind(Kind::Int64);
    let l = s.seq_len();
    let fast: Vec<i64> = Vec::try_from(fast.flatten(0, -1)).unwrap();
    let slow = brute_force(kind, s);
    for q in 0..l {
        for k in 0..l {
            assert_eq!(fast[q * l + k] != 0, slow[q][k], "{kind:?} {s:?}: query {q}, key {k}");
        }
    }
}

#[test]
fn masks_match_brute_force() {
    for s in [
        StreamShape { text_len: 5, grid: 6, conv_kernel: 5 },
        StreamShape { text_len: 3, grid: 8, conv_kernel: 11 },
        StreamShape { text_len: 1, grid: 4, conv_kernel: 3 },
    ] {
        for kind in [AttentionKind::Full, AttentionKind::Row, AttentionKind::Column, AttentionKind::Conv] {
            check(kind, s);
        }
    }
}

#[test]
fn sparse_masks_are_sparser_than_full() {
    let s = StreamShape { text_len: 4, grid: 8, conv_kernel: 5 };
    let count = |k| build_mask(k, s, Device::Cpu).to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
    let full = count(AttentionKind::Full);
    for k in [AttentionKind::Row, AttentionKind::Column, AttentionKind::Conv] {
        assert!(count(k) < full, "{k:?} is not sparser than full attention");
    }
}

#[test]
fn paper_layer_rule() {
    use AttentionKind::*;
    let kinds = tessera::Config::dalle_12b().transformer.layer_kinds();
    assert_eq!(kinds.len(), 64);
    assert_eq!(&kinds[..6], &[Row, Column, Row, Row, Row, Column]);
    assert_eq!(kinds[62], Row); // layer 63: (63 − 2) mod 4 = 1
    assert_eq!(kinds[63], Conv);
    assert_eq!(kinds.iter().filter(|k| **k == Column).count(), 16);
}

#[test]
fn static_decode_rows_are_the_brute_force_rows_over_an_aligned_cache() {
    use tessera::attention::{KEY_ALIGN, Mask, MaskSet, padded_len};
    assert_eq!((padded_len(24), padded_len(32), padded_len(33), padded_len(1)), (32, 32, 48, 16));
    let kinds = [AttentionKind::Full, AttentionKind::Row, AttentionKind::Column, AttentionKind::Conv];
    for s in
        [StreamShape { text_len: 5, grid: 6, conv_kernel: 5 }, StreamShape { text_len: 7, grid: 3, conv_kernel: 3 }]
    {
        let set = MaskSet::new(&kinds, s, Device::Cpu);
        let (l, lc) = (s.seq_len(), set.cache_len());
        assert!(lc >= l && lc < l + KEY_ALIGN && lc % KEY_ALIGN == 0, "cache of {lc} for a stream of {l}");
        for kind in kinds {
            let slow = brute_force(kind, s);
            // f32 and bf16 get an additive bias (0 / −∞), any other dtype a boolean row
            for dtype in [Kind::Float, Kind::BFloat16, Kind::Half] {
                for (q, slow_row) in slow.iter().enumerate() {
                    let mut rows = vec![set.static_row(kind, q, dtype)];
                    // image queries by their index held in a tensor, as a captured step reads them
                    if let Some(j) = q.checked_sub(s.text_len + 1) {
                        rows.push(set.static_row_at(kind, &tch::Tensor::from_slice(&[j as i64]), dtype));
                    }
                    for row in rows {
                        let Mask::Explicit(row) = row else { panic!("{kind:?}: a static row is an explicit mask") };
                        assert_eq!(row.size(), [1, lc as i64], "{kind:?} {dtype:?} query {q}");
                        let allowed: Vec<bool> = if dtype == Kind::Half {
                            assert_eq!(row.kind(), Kind::Bool);
                            Vec::<bool>::try_from(row.flatten(0, -1)).unwrap()
                        } else {
                            assert_eq!(row.kind(), dtype);
                            let v = Vec::<f32>::try_from(row.to_kind(Kind::Float).flatten(0, -1)).unwrap();
                            assert!(v.iter().all(|&x| x == 0.0 || x == f32::NEG_INFINITY), "{kind:?}: bias {v:?}");
                            v.iter().map(|&x| x == 0.0).collect()
                        };
                        for (k, &a) in allowed.iter().enumerate() {
                            let want = k < l && slow_row[k];
                            assert_eq!(a, want, "{kind:?} {dtype:?} {s:?}: query {q}, key {k}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_sparse_decode_step_reads_exactly_the_brute_force_keys_once() {
    use tessera::attention::decode_blocks;
    let kinds = [AttentionKind::Full, AttentionKind::Row, AttentionKind::Column, AttentionKind::Conv];
    // windows wider than the grid, clipped at every edge, and the paper's shapes
    for s in [
        StreamShape { text_len: 5, grid: 6, conv_kernel: 5 },
        StreamShape { text_len: 7, grid: 3, conv_kernel: 7 },
        StreamShape { text_len: 1, grid: 8, conv_kernel: 3 },
        StreamShape { text_len: 256, grid: 32, conv_kernel: 11 },
    ] {
        for kind in kinds {
            let slow = brute_force(kind, s);
            for (q, slow_row) in slow.iter().enumerate() {
                let blocks = decode_blocks(kind, s, q);
                let mut read: Vec<usize> = blocks.iter().flat_map(|b| b.positions().collect::<Vec<_>>()).collect();
                let n = read.len();
                read.sort_unstable();
                read.dedup();
                assert_eq!(read.len(), n, "{kind:?} {s:?}: query {q} reads a key twice: {blocks:?}");
                let want: Vec<usize> = (0..s.seq_len()).filter(|&k| slow_row[k]).collect();
                assert_eq!(read, want, "{kind:?} {s:?}: query {q}, blocks {blocks:?}");
            }
        }
    }
    // what the sparse step saves at the paper's shapes: row attention at the last position
    // reads the caption and grid + 1 image keys, not the whole stream
    let s = StreamShape { text_len: 256, grid: 32, conv_kernel: 11 };
    let last = s.seq_len() - 1;
    let keys = |kind| decode_blocks(kind, s, last).iter().map(|b| b.len()).sum::<usize>();
    assert_eq!(keys(AttentionKind::Full), 1280);
    assert_eq!(keys(AttentionKind::Row), 257 + 33);
    assert_eq!(keys(AttentionKind::Column), 257 + 32);
    // the last token (row 31, column 30): five rows above of columns 25..=31, and 25..=30 of its own
    assert_eq!(keys(AttentionKind::Conv), 257 + 5 * 7 + 6);
}
