//! The `tessera` command line: generate images, describe models, benchmark.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use tessera::bench::{self, BenchOptions};
use tessera::model::Model;
use tessera::transformer::DecodeMode;
use tessera::{Config, SampleOptions, params};

/// The presets `--preset` and `--random-init` take, as their help names them (one list for
/// every command; `tests/cli.rs` checks it against `tessera::config::PRESETS`).
macro_rules! presets {
    () => {
        "tiny, S, P, L, dalle_12b, default or gpu-default"
    };
}

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "DALL·E on libtorch: text-to-image with a discrete VAE and a sparse transformer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images for a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Print a model's or a preset's configuration and parameter counts.
    Info(InfoArgs),
    /// Measure sampling and training throughput (JSON on stdout).
    Bench(BenchArgs),
    /// The synthetic world: export captioned scenes as files.
    #[command(subcommand)]
    World(WorldCommand),
    /// Train the tokenizer, the dVAE, the transformer or the reranker of a model directory.
    #[command(subcommand)]
    Train(TrainCommand),
    /// The dVAE alone: an image to a token file, a token file to an image, or an image through
    /// both (a model directory with only config.json and dvae.safetensors is enough).
    #[command(subcommand)]
    Dvae(DvaeCommand),
    /// Start a model directory from a preset around another directory's trained dVAE (an
    /// imported OpenAI dVAE, say); then train its tokenizer, transformer and reranker.
    Init {
        /// The new model directory.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, help = concat!("Preset for the transformer, text and reranker: ", presets!()))]
        preset: String,
        /// Directory whose config.json and dvae.safetensors give the dVAE.
        #[arg(long)]
        dvae_from: PathBuf,
    },
    /// Open the desktop app (prompt, completion canvas, reranked gallery, export).
    #[cfg(feature = "app")]
    App(AppArgs),
    /// Score a model on held-out captions of the synthetic world; writes a report.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Captions per capability and split.
        #[arg(long, default_value_t = 10)]
        captions: usize,
        /// Samples per caption, reranked to the top one (0: measure only the dVAE — PSNR and
        /// the evaluator's score on ground truth through it — in seconds).
        #[arg(long, default_value_t = 16)]
        samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "eval")]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// libtorch CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Keep the samples in this file and read them back next time when the transformer,
        /// dVAE, tokenizer and settings are the same: rerankers compared on the very same
        /// samples, with only the reranking to run.
        #[arg(long)]
        samples_file: Option<PathBuf>,
        /// Rank the judged samples in this folder (made by `train judged`; give scenes the
        /// reranker did not learn from) instead of drawing samples: per capability, how often
        /// the reranker's pick is right and how it orders (right, wrong) pairs, on thousands of
        /// scenes with only the reranker running. Writes OUT/judged.json.
        #[arg(long, conflicts_with = "samples_file")]
        judged: Option<PathBuf>,
        /// With --judged: decode the codes the bank's model drew with this model's dVAE and
        /// judge the pictures again before ranking them (another decoder of the same codes,
        /// measured on the very same samples).
        #[arg(long, requires = "judged")]
        redecode: bool,
        /// Score only these capabilities, comma-separated (single_object, two_objects_position,
        /// count, stack, text, transform), on the very captions and seeds of a full evaluation:
        /// one cell measured on many captions in the time of a few.
        #[arg(long, value_delimiter = ',', value_parser = tessera::world::Capability::parse, conflicts_with = "judged")]
        only: Vec<tessera::world::Capability>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
}

/// Sampling flags shared by `generate` and `eval`; each one left out takes the model's own
/// setting (`sampling` in its config.json; plain sampling where it has none).
#[derive(Args)]
struct SamplingArgs {
    /// Softmax temperature (0 = the most likely token) [default: the model's, else 1]
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep only the k most likely tokens (0 = off) [default: the model's, else 0]
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold (1 = off) [default: the model's, else 1]
    #[arg(long)]
    top_p: Option<f64>,
    /// Classifier-free guidance scale (1 = off) [default: the model's, else 1]
    #[arg(long)]
    guidance: Option<f64>,
}

impl SamplingArgs {
    /// The flags given, over the model's own settings `model`.
    fn options(&self, model: &SampleOptions) -> Result<SampleOptions> {
        let o = SampleOptions {
            temperature: self.temperature.unwrap_or(model.temperature),
            top_k: self.top_k.unwrap_or(model.top_k),
            top_p: self.top_p.unwrap_or(model.top_p),
            guidance: self.guidance.unwrap_or(model.guidance),
        };
        o.validate()?;
        Ok(o)
    }
}

#[cfg(feature = "app")]
#[derive(Args)]
struct AppArgs {
    #[command(flatten)]
    source: ModelSource,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch CPU threads for the model (default: all cores but one, left to the UI).
    #[arg(long)]
    threads: Option<usize>,
    /// Folder for autosaved samples (default: the platform's data folder).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run a scripted session (generate, then cancel a second job), write its measurements
    /// (frame times, first preview, cancel latency) as JSON to this file and exit.
    #[arg(long, value_name = "FILE")]
    diagnostics: Option<PathBuf>,
}

/// The model directory whose dVAE a `dvae` subcommand uses, and where it runs.
#[derive(Args)]
struct DvaeAt {
    /// Model directory (config.json and dvae.safetensors are enough).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum DvaeCommand {
    /// Encode an image (centre-cropped, resized to the dVAE's size) into a token file (JSON).
    Encode {
        image: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        at: DvaeAt,
    },
    /// Decode a token file made by the same dVAE into a PNG.
    Decode {
        tokens: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        at: DvaeAt,
    },
    /// Encode and decode an image: writes the reconstruction (default IMAGE_STEM.roundtrip.png
    /// in the current folder) and prints its PSNR and the time of each half.
    Roundtrip {
        image: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        at: DvaeAt,
    },
}

#[derive(Subcommand)]
enum WorldCommand {
    /// Write N scenes as NAME.png, NAME.txt (caption) and NAME.json (ground truth).
    Export {
        #[arg(long, default_value_t = 16)]
        n: u64,
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw from the held-out colour–shape pairs instead of the training ones.
        #[arg(long)]
        held_out: bool,
    },
}

/// The model directory and the data every `train` subcommand takes.
#[derive(Args, Clone)]
struct ModelData {
    /// Model directory (created with --preset when new).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, help = concat!("Configuration for a new directory: ", presets!()))]
    preset: Option<String>,
    /// With --preset: change one setting of it, as a dotted key of config.json
    /// (`--set dvae.vocab_size=2048`); repeat for several.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "preset")]
    settings: Vec<String>,
    /// world, world:SEED, world-balanced[:SEED] (single objects' four backgrounds equally
    /// often, for a dVAE), world-dense[:SEED] (half the pictures crowds of objects on any
    /// background; dVAE only), each optionally with capability weights
    /// (`world:4@text=2.5,transform=2`: text scenes 2.5 times and transforms twice as often
    /// against the rest), a folder of NAME.png|jpg + NAME.txt, or WebDataset .tar shards.
    #[arg(long, default_value = "world")]
    data: String,
}

#[derive(Args, Clone)]
struct CommonTrain {
    #[command(flatten)]
    at: ModelData,
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Write a sample grid every N steps (0 = never).
    #[arg(long, default_value_t = 1000)]
    sample_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, bf16 (bf16 matrix products and convolutions, f32 master weights), or auto: bf16
    /// on CUDA and on CPUs with AVX-512 BF16, f32 elsewhere. The reranker trains in f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// libtorch CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Continue from the directory's last training checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps of this run (checkpointing there); --resume continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Loader threads that render or read the data (default: every core but one).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Train from the token shards in this folder (made by `train shards`) instead of
    /// rendering and encoding pictures (transformer and reranker).
    #[arg(long)]
    shards: Option<PathBuf>,
    /// Store the averaged weights in bf16 (half the size).
    #[arg(long)]
    bf16_weights: bool,
    /// Train for about this long (90s, 8m, 1h30m): a few throwaway steps measure the speed and
    /// --steps becomes what fits, so the schedules are those of a run of that length; the run
    /// also stops (checkpointing) once the time is up. Steps named in other flags (warm-up,
    /// --hard-from) stay as given.
    #[arg(long, conflicts_with = "resume")]
    time: Option<String>,
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Train the BPE tokenizer on captions of the data.
    Tokenizer {
        #[command(flatten)]
        at: ModelData,
        /// Captions to learn the merges from.
        #[arg(long, default_value_t = 20_000)]
        captions: usize,
    },
    /// Train the discrete VAE (paper recipe: AdamW, cosine β, τ and learning rate, EMA).
    Dvae {
        #[command(flatten)]
        common: CommonTrain,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        #[arg(long, default_value_t = 1.25e-6)]
        lr_end: f64,
        #[arg(long, default_value_t = 6.6)]
        beta: f64,
        #[arg(long, default_value_t = 5_000)]
        beta_steps: usize,
        #[arg(long, default_value_t = 1.0 / 16.0)]
        tau_end: f64,
        #[arg(long, default_value_t = 150_000)]
        tau_steps: usize,
        #[arg(long, default_value_t = 0.999)]
        ema: f64,
        /// Weight of a codebook-usage term (log V minus the entropy of the batch's average
        /// posterior) added to the paper's objective; 0 = the paper's recipe.
        #[arg(long, default_value_t = 0.0)]
        usage_weight: f64,
        /// From this step on, the decoder is given the one-hot of the sampled code (as at
        /// inference) with straight-through gradients to the encoder (default: never).
        #[arg(long)]
        hard_from: Option<usize>,
        /// Reconstruction term: `laplace` (the paper's logit-Laplace likelihood), `mse`
        /// (squared error, σ = 0.1: weighs edges and small shapes more) or `l1` (absolute
        /// error: edges drawn where they are likeliest rather than blurred between places).
        #[arg(long, default_value = "laplace")]
        recon: tessera::dvae::Recon,
        /// Fine-tune only the decoder of the directory's trained dVAE on the encoder's hard
        /// codes (the encoder, and so every image's tokens, stay exactly as they are: a
        /// transformer trained on them remains valid). --resume continues this run.
        #[arg(long)]
        decoder_only: bool,
        /// With --decoder-only: first grow the decoder to this base width (its groups then have
        /// 1, 2, 4, … times it). The grown decoder draws exactly what the trained one drew and
        /// trains on from there; config.json records its size.
        #[arg(long)]
        decoder_hidden: Option<usize>,
        /// With --decoder-only: first grow the decoder to this many residual blocks per group
        /// (new blocks start as the identity).
        #[arg(long)]
        decoder_blocks: Option<usize>,
        /// Start every weight (encoder, codebook, decoder) from this trained dvae.safetensors of
        /// the directory's shapes instead of random ones, e.g. to train a model's whole dVAE
        /// further on a fresh schedule; its codes then change, so retrain the transformer on them.
        /// Ignored when --resume continues a run.
        #[arg(long, conflicts_with = "decoder_only")]
        init_from: Option<PathBuf>,
        /// With --hard-from: the decoder is given the one-hot of the encoder's argmax code,
        /// exactly as at inference, instead of a Gumbel sample's (for training further a dVAE
        /// whose decoder was fine-tuned on its argmax codes).
        #[arg(long, requires = "hard_from")]
        argmax_codes: bool,
        /// With --init-from: first split each of its codes into several (N / its codebook size
        /// copies, told apart by a small perturbation of their logits), so that the dVAE draws
        /// what it drew and training can use the new codes for what one code lost; a
        /// transformer of the old codes carries over (`train transformer --codes-from`).
        /// config.json records N.
        #[arg(long, value_name = "N", requires = "init_from")]
        codebook: Option<usize>,
        /// With --init-from: train only the encoder's codebook logits and the decoder; the
        /// encoder's convolutions keep the --init-from weights.
        #[arg(long, requires = "init_from")]
        freeze_trunk: bool,
    },
    /// Train the transformer (paper recipe: AdamW(0.9, 0.96), warm-up, clipping 4, EMA).
    Transformer {
        #[command(flatten)]
        common: CommonTrain,
        #[arg(long, default_value_t = 4.5e-4)]
        lr: f64,
        #[arg(long, default_value_t = 5_000)]
        warmup: usize,
        #[arg(long, default_value_t = 0.99)]
        ema: f64,
        #[arg(long, default_value_t = 4.0)]
        clip: f64,
        /// Start from this transformer.safetensors (same shape) instead of random weights, e.g.
        /// to retrain a model's transformer for a new dVAE. Ignored when --resume continues a run.
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// The model directory whose dVAE made the codes the --init-from transformer learnt:
        /// its image tokens are carried over to this directory's codes (by encoding 2,048
        /// pictures with both dVAEs) before training, so a new dVAE's transformer starts near
        /// the old one; the codebooks may differ in size (a split one: `train dvae --codebook`).
        /// Needs --init-from and the same picture and grid sizes.
        #[arg(long)]
        codes_from: Option<PathBuf>,
    },
    /// Encode a training set with the directory's dVAE once into token shards
    /// (DIR/shards/shard-NNNNN.tok), for `--shards` training of the transformer and reranker.
    Shards {
        #[command(flatten)]
        at: ModelData,
        /// Examples to encode.
        #[arg(long, default_value_t = 100_000)]
        examples: usize,
        /// Examples per shard file.
        #[arg(long, default_value_t = 8192)]
        per_shard: usize,
        /// Pictures per encoder call.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Output folder (default DIR/shards).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Instead of encoding pictures: the right samples' codes of a bank of judged samples
        /// (`train judged`) drawn by DIR's model, as `shard-judged-NNNNN.tok` in the output
        /// folder, read beside the world's shards there (fine-tuning the transformer on the
        /// code sequences it drew that the evaluator passed).
        #[arg(long, value_name = "BANK")]
        from_judged: Option<PathBuf>,
    },
    /// Train a whole model in a time budget: tokenizer, dVAE, token shards, transformer,
    /// reranker, then the evaluation report (DIR/eval). The plan is in DIR/train-all.json.
    All {
        #[command(flatten)]
        at: ModelData,
        /// Wall-clock budget for the whole run: 90s, 8m, 1h30m…
        #[arg(long)]
        budget: String,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Continue a killed run from its last checkpoint, with the same plan.
        #[arg(long)]
        resume: bool,
        /// Loader threads (default: every core but one).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// libtorch CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Batch sizes (default: by device; the dVAE's 8 on a CPU, 128 on a GPU).
        #[arg(long)]
        dvae_batch: Option<usize>,
        #[arg(long)]
        transformer_batch: Option<usize>,
        #[arg(long)]
        reranker_batch: Option<usize>,
        /// Most captions per capability for the closing evaluation (fewer if its share of
        /// the budget is short; 0 = no evaluation).
        #[arg(long, default_value_t = 20)]
        eval_captions: usize,
        #[arg(long, default_value_t = 16)]
        eval_samples: usize,
        /// The dVAE's codebook-usage weight (0 = the paper's objective; see `train dvae`).
        #[arg(long, default_value_t = 0.0)]
        usage_weight: f64,
        /// The dVAE's largest KL weight β (the paper's 6.6).
        #[arg(long, default_value_t = 6.6)]
        beta: f64,
        /// Final share of the dVAE's steps trained on hard codes with the straight-through
        /// estimator (0 = the paper's relaxation throughout; see `train dvae --hard-from`).
        #[arg(long, default_value_t = 0.0)]
        hard_tail: f64,
        /// With --hard-tail: the straight-through steps give the decoder the encoder's argmax
        /// codes, as sampling does (see `train dvae --argmax-codes`); `--hard-tail 1
        /// --argmax-codes` trains on them from the first step.
        #[arg(long)]
        argmax_codes: bool,
        /// The dVAE's reconstruction term: `laplace` (the paper's), `mse` or `l1` (see `train
        /// dvae`).
        #[arg(long, default_value = "laplace")]
        recon: tessera::dvae::Recon,
        /// Compute dtype of the dVAE and transformer stages: f32, bf16 (bf16 matrix products
        /// and convolutions, f32 master weights, losses and hard codes), or auto: bf16 on CUDA
        /// and on CPUs with AVX-512 BF16, f32 elsewhere.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// Use the trained dVAE of this directory (an imported OpenAI dVAE, say) instead of
        /// training one; its share of the budget goes to the transformer.
        #[arg(long, conflicts_with = "resume")]
        dvae_from: Option<PathBuf>,
        /// The dVAE stage's own data. Default: with --data world[:SEED] the same world drawn
        /// dense (world-dense[:SEED]: crowds of objects, pictures for a dVAE only, which keep
        /// far more of the shapes), otherwise --data.
        #[arg(long, conflicts_with = "dvae_from")]
        dvae_data: Option<String>,
        /// Continue a trained model: take this directory's tokenizer (and, without --preset,
        /// its configuration) and start the transformer and reranker from its weights. With
        /// --dvae-from the same directory, the whole model trains further on this device.
        #[arg(long, conflicts_with = "resume")]
        init_from: Option<PathBuf>,
    },
    /// Train the contrastive reranker (AdamW(0.9, 0.98), warm-up and cosine decay).
    Reranker {
        #[command(flatten)]
        common: CommonTrain,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// Start from this reranker.safetensors (same shape) instead of random weights, e.g. to
        /// fit a model's reranker to the pictures of its new dVAE (with --shards). Ignored when
        /// --resume continues a run.
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// Contrasting captions per picture (one colour, shape, size, count, relation, order,
        /// letter or transform changed) that it must score below its own, beside the batch's
        /// other captions: teaches the details a ranking among samples of one prompt turns on.
        /// 0: the batch alone, as in CLIP.
        #[arg(long, default_value_t = 0)]
        contrasts: usize,
        /// Contrasting pictures per caption: its scene with one detail the caption names
        /// changed (a colour, a shape, the two objects' places, the count, a stack's order, a
        /// letter, the bottom half of a transform), rendered, that the caption must score below
        /// its own picture. Needs --data world (pictures, not --shards). 0: none. May be given
        /// with --contrasts.
        #[arg(long, default_value_t = 0)]
        contrast_images: usize,
        /// Pass the pictures (and contrasting pictures) through the model's dVAE, encoded and
        /// decoded, before the reranker sees them, as the samples it will rank are (pictures
        /// from --shards always are).
        #[arg(long)]
        through_dvae: bool,
        /// Make the contrasting pictures near misses: a changed shape is usually one of its two
        /// look-alikes (an octagon becomes a circle or a heptagon), and some stack contrasts
        /// move a block off the column or give it another shape.
        #[arg(long)]
        near_contrasts: bool,
        /// Judged samples (made by `train judged`): the model's own samples of world scenes,
        /// judged right or wrong. Each step adds --judged-batch of their scenes, a right sample
        /// as the caption's picture and --judged-negatives wrong ones it must score below.
        /// Not with --contrast-images.
        #[arg(long)]
        judged: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        judged_batch: usize,
        #[arg(long, default_value_t = 4)]
        judged_negatives: usize,
    },
    /// Draw the model's own samples of world scenes (training split) and judge each right or
    /// wrong with the evaluator, into DIR/judged (part-NNNNN.safetensors), for `train reranker
    /// --judged`. A killed run continues at the first part missing.
    Judged {
        /// The model directory (config, tokenizer, dVAE, transformer).
        #[arg(long)]
        dir: PathBuf,
        /// World scenes (rounded up to whole parts of 64).
        #[arg(long, default_value_t = 2048)]
        scenes: usize,
        /// Samples per scene.
        #[arg(long, default_value_t = 8)]
        per_scene: usize,
        /// Rows per sampling batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Output folder (default DIR/judged).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, bf16 or auto (as `generate --dtype`).
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// libtorch CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Args)]
struct ModelSource {
    /// Model directory (config.json, tokenizer.json, *.safetensors); default: the embedded
    /// default model.
    #[arg(long, conflicts_with = "random_init")]
    model: Option<PathBuf>,
    #[arg(long, value_name = "PRESET", help = concat!("Use a randomly initialised preset instead of a trained model: ", presets!()))]
    random_init: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    source: ModelSource,
    /// The caption to draw.
    #[arg(long)]
    prompt: String,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 4)]
    n: usize,
    /// Keep the K samples the reranker scores best (all when omitted or without a reranker).
    #[arg(long)]
    keep: Option<usize>,
    /// Seed of the first sample (sample i uses seed + i); random when omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Samples drawn together (the same images at any batch). Default: all of them on a GPU,
    /// halved while the device runs out of memory; 64 on the CPU, where larger batches sample
    /// no faster.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch: Option<u64>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// An image whose top rows are kept; the model completes the rest.
    #[arg(long, requires = "keep_rows")]
    prefix_image: Option<PathBuf>,
    /// Token rows of the prefix image to keep.
    #[arg(long, requires = "prefix_image")]
    keep_rows: Option<usize>,
    /// Output folder.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads for libtorch (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Sampling dtype of the transformer: auto (f32 for now, on CPU and CUDA), f32 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Decode steps: static (same shapes every step: attention over the whole cache, masked),
    /// growing (over the keys written so far; a sparse layer reads only its pattern's keys),
    /// growing-masked (every key written, the pattern masked), or auto (static on CUDA, growing
    /// on the CPU).
    #[arg(long, default_value = "auto")]
    decode: String,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    #[arg(long, help = concat!("A preset: ", presets!()))]
    preset: Option<String>,
    /// With --preset: change one of its settings (`--set dvae.vocab_size=2048`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "preset")]
    settings: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16 (bf16 weights for sampling; f32 master weights and bf16
    /// matrix products for training).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// libtorch CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed runs per figure (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Configurations to measure.
    #[arg(long, value_delimiter = ',', default_value = "S,P")]
    configs: Vec<String>,
    #[arg(long, default_value_t = 4)]
    sample_batch: usize,
    /// Training batch (0: sampling figures alone).
    #[arg(long, default_value_t = 8)]
    train_batch: usize,
    /// Measure the data loader alone instead (no model): pictures rendered per second by 1, 2, …
    /// up to this many worker threads, and tokens served per second from --shards.
    #[arg(long)]
    loader: Option<usize>,
    /// Token shard folder for --loader.
    #[arg(long)]
    shards: Option<PathBuf>,
    /// Picture side for --loader.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Decode steps of the sampling figures: auto, static, growing or growing-masked (as
    /// `generate --decode`).
    #[arg(long, default_value = "auto")]
    decode: String,
    /// Sample every row of the batch from its own caption (as `eval` does), not one caption
    /// for the batch (as `generate` and the app do).
    #[arg(long)]
    distinct_captions: bool,
    /// Round the random transformer weights to bf16 values, as a model stored in bf16 holds
    /// (the embedded default model's): CPU f32 decode steps then read them as bf16.
    #[arg(long)]
    bf16_weights: bool,
}

fn main() {
    // TESSERA_CUDNN=0 turns cuDNN off (a probe for kernels that plan per shape)
    if std::env::var("TESSERA_CUDNN").is_ok_and(|v| v == "0") {
        tch::Cuda::set_user_enabled_cudnn(false);
    }
    let cli = Cli::parse();
    quiet_on_closed_pipe(&cli.command);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A command-line run whose reader goes away (`tessera info | head`) ends as other Unix tools
/// do, by SIGPIPE's default action, instead of panicking on the failed print (Rust ignores
/// SIGPIPE, so every write would report a broken pipe). The app keeps Rust's handling: its
/// windowing sockets report a closed peer as an error, not a signal.
fn quiet_on_closed_pipe(command: &Command) {
    #[cfg(feature = "app")]
    let app = matches!(command, Command::App(_));
    #[cfg(not(feature = "app"))]
    let app = {
        let _ = command;
        false
    };
    #[cfg(unix)]
    if !app {
        // SAFETY: restores a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    #[cfg(not(unix))]
    let _ = app;
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => run_bench(a),
        Command::World(WorldCommand::Export { n, out, size, seed, held_out }) => {
            world_export(n, &out, size, seed, held_out)
        }
        Command::Train(t) => train(t),
        Command::Dvae(d) => dvae_command(d),
        Command::Init { dir, preset, dvae_from } => {
            let cfg = tessera::codes::init_with_dvae(&dir, &Config::preset(&preset)?, &dvae_from)?;
            let p = params::count(&cfg);
            eprintln!(
                "{} started: {} px images as {}×{} codes of {}, a {:.1} M-parameter transformer; next: \
                 tessera train tokenizer / transformer / reranker --dir {} --data FOLDER",
                dir.display(),
                cfg.dvae.image_size,
                cfg.dvae.grid_size(),
                cfg.dvae.grid_size(),
                cfg.dvae.vocab_size,
                p.transformer as f64 / 1e6,
                dir.display()
            );
            Ok(())
        }
        #[cfg(feature = "app")]
        Command::App(a) => {
            let device = tessera::parse_device(&a.device)?;
            let model = tessera::app::run::startup_model(a.source.model, a.source.random_init);
            // The diagnostic autosaves into a fresh folder, never into the person's gallery.
            let data_dir = match (&a.diagnostics, a.data_dir) {
                (_, Some(d)) => Some(d),
                (Some(_), None) => {
                    Some(std::env::temp_dir().join(format!("tessera-diagnostics-{}", std::process::id())))
                }
                (None, None) => tessera::app::run::default_data_dir(),
            };
            // Leave a core to the window's renderer (software rendering runs on the CPU too).
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = a.threads.or(Some(cores.saturating_sub(1).max(1)));
            let opts = tessera::app::AppOptions { model, device, threads, data_dir };
            tessera::app::run::run(opts, a.diagnostics)
        }
        Command::Eval {
            model,
            captions,
            samples,
            seed,
            out,
            device,
            dtype,
            threads,
            samples_file,
            judged,
            redecode,
            only,
            sampling,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t as i32);
            }
            let device = tessera::parse_device(&device)?;
            if let Some(judged) = judged {
                // only the reranker runs: --dtype (the transformer's) does not apply
                let m = Model::load(&model, device).with_context(|| format!("loading model {}", model.display()))?;
                let r = tessera::judged::rank(&m, &judged, redecode, |done, parts| {
                    eprint!("\rranking judged samples: part {done}/{parts}")
                })
                .with_context(|| format!("ranking the judged samples in {}", judged.display()))?;
                eprintln!();
                let json = judged_json(&r);
                std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
                let path = out.join("judged.json");
                tessera::io::write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
                println!("{}", serde_json::to_string_pretty(&json)?);
                eprintln!("ranking written to {}", path.display());
                return Ok(());
            }
            let dvae_alone = samples == 0 && !model.join(tessera::model::TRANSFORMER_FILE).exists();
            let mut m = if dvae_alone {
                eprintln!("eval: {} has no transformer: scoring its dVAE alone", model.display());
                Model::load_dvae_only(&model, device)
            } else {
                Model::load(&model, device)
            }
            .with_context(|| format!("loading model {}", model.display()))?;
            m.set_dtype(tessera::parse_dtype(&dtype, device)?)?;
            let sample = sampling.options(&m.config.sampling)?;
            let opts = tessera::report::EvalOptions { captions, samples, seed, sample, samples_file, only };
            let r = tessera::report::evaluate(&m, &opts, &out, |l| eprintln!("eval: {l}"))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            eprintln!("report written to {}", out.display());
            Ok(())
        }
    }
}

/// A ranking of judged samples with its rates beside the counts.
fn judged_json(r: &tessera::judged::Ranking) -> serde_json::Value {
    let cell = |c: &tessera::judged::RankCell| {
        let (top1, per_sample, any_right, pair_order) = c.rates();
        serde_json::json!({
            "scenes": c.scenes, "top1": top1, "per_sample": per_sample, "any_right": any_right,
            "pair_order": pair_order, "pairs": c.pairs, "counts": c,
        })
    };
    let cells: serde_json::Map<String, serde_json::Value> = r.cells.iter().map(|(k, c)| (k.clone(), cell(c))).collect();
    serde_json::json!({ "parts": r.parts, "skipped": r.skipped, "all": cell(&r.all), "cells": cells })
}

fn load_model(src: &ModelSource, device: tch::Device) -> Result<Model> {
    match (&src.model, &src.random_init) {
        (Some(dir), _) => Model::load(dir, device).with_context(|| format!("loading model {}", dir.display())),
        (None, Some(preset)) => {
            let cfg = Config::preset(preset)?;
            eprintln!("note: {preset} is randomly initialised; its images are noise until trained");
            Ok(Model::random_init(&cfg, device, 0)?)
        }
        (None, None) if Model::has_embedded_default() => Ok(Model::load_embedded_default(device)?),
        (None, None) => bail!("this build has no embedded default model: give --model DIR or --random-init PRESET"),
    }
}

fn unused_path(dir: &Path, seed: u64) -> PathBuf {
    let first = tessera::model::sample_file_name(dir, seed);
    if !first.exists() {
        return first;
    }
    (1..).map(|i| dir.join(format!("sample-{seed}-{i}.png"))).find(|p| !p.exists()).unwrap_or(first)
}

fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t as i32);
    }
    let device = tessera::parse_device(&a.device)?;
    let decode = DecodeMode::parse(&a.decode)?;
    let t_load = std::time::Instant::now();
    let mut model = load_model(&a.source, device)?;
    model.set_dtype(tessera::parse_dtype(&a.dtype, device)?)?;
    model.sample_batch = a.batch.map(|b| b as usize);
    let load_s = t_load.elapsed().as_secs_f64();
    model.transformer.net.set_decode_mode(decode);
    let enc = model.encode_prompt(&a.prompt)?;
    if enc.truncated() {
        let n = model.config.text.text_len;
        eprintln!("warning: the prompt has more than {n} tokens; only the first {n} are used");
    }
    let prefix = match (&a.prefix_image, a.keep_rows) {
        (Some(path), Some(rows)) => {
            let (rgb, _) = tessera::store::read_rgb_square(path, Some(model.config.dvae.image_size))?;
            Some(model.prefix_tokens(&rgb, rows)?)
        }
        _ => None,
    };
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(0)
    });
    let opts = a.sampling.options(&model.config.sampling)?;
    let t0 = std::time::Instant::now();
    let mut last_pct = usize::MAX;
    let mut graphs = false;
    let samples = model.generate(&a.prompt, a.n, seed, prefix.as_ref(), &opts, |s| {
        graphs |= s.uses_cuda_graph();
        let p = s.progress();
        let pct = 100 * p.done / p.total.max(1);
        if pct != last_pct {
            last_pct = pct;
            eprint!("\rsampling {}/{} tokens ({pct}%)", p.done, p.total);
            let _ = std::io::stderr().flush();
        }
        true
    })?;
    eprintln!();
    let sample_s = t0.elapsed().as_secs_f64();
    let mut samples = samples;
    let rgb: Vec<Vec<u8>> = samples.iter().map(|s| s.rgb.clone()).collect();
    let t_rerank = std::time::Instant::now();
    let scores = model.rerank(&a.prompt, &rgb)?;
    let rerank_s = t_rerank.elapsed().as_secs_f64();
    if let Some(scores) = scores {
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
        for &i in &order {
            eprintln!("seed {}: reranker score {:.2}", samples[i].seed, scores[i]);
        }
        let keep = a.keep.unwrap_or(samples.len());
        samples = order.into_iter().take(keep).map(|i| samples[i].clone()).collect();
    } else if a.keep.is_some() {
        eprintln!("note: this model has no reranker; keeping every sample");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let t_write = std::time::Instant::now();
    for s in &samples {
        let path = unused_path(&a.out, s.seed);
        let img = image::RgbImage::from_raw(s.size as u32, s.size as u32, s.rgb.clone()).context("image buffer")?;
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
        tessera::io::write_atomic(&path, &bytes)?;
        println!("{}", path.display());
    }
    let how = if graphs { " (decode steps replayed as a CUDA graph)" } else { "" };
    eprintln!(
        "time: model load {load_s:.3}s, sampling and decoding {sample_s:.3}s, reranking {rerank_s:.3}s, writing {:.3}s",
        t_write.elapsed().as_secs_f64()
    );
    eprintln!(
        "{} image{} in {:.1}s on {}{how}",
        samples.len(),
        if samples.len() == 1 { "" } else { "s" },
        t0.elapsed().as_secs_f64(),
        tessera::device_name(device)
    );
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let cfg = match (&a.model, &a.preset) {
        (Some(dir), _) => Model::load_config(dir)?,
        (None, Some(p)) => Config::preset(p)?.with_settings(&a.settings)?,
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let count = params::count(&cfg);
    if a.json {
        let mut p = serde_json::Map::new();
        p.insert("total".into(), count.total.into());
        p.insert("transformer".into(), count.transformer.into());
        p.insert("dvae".into(), count.dvae.into());
        for (k, v) in count
            .transformer_parts
            .iter()
            .map(|(k, v)| (format!("transformer.{k}"), v))
            .chain(count.dvae_parts.iter().map(|(k, v)| (format!("dvae.{k}"), v)))
        {
            p.insert(k, (*v).into());
        }
        let out = serde_json::json!({
            "name": cfg.name,
            "params": p,
            "grid": cfg.grid_size(),
            "seq_len": cfg.seq_len(),
            "layer_attention": cfg.transformer.layer_kinds(),
            "config": cfg,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    println!();
    println!(
        "stream: {} text + {} image tokens ({}×{} grid)",
        cfg.text.text_len,
        cfg.image_len(),
        cfg.grid_size(),
        cfg.grid_size()
    );
    println!("parameters: {} total", human(count.total));
    println!("  transformer {}", human(count.transformer));
    for (k, v) in &count.transformer_parts {
        println!("    {k:<11} {}", human(*v));
    }
    println!("  dvae        {}", human(count.dvae));
    for (k, v) in &count.dvae_parts {
        println!("    {k:<11} {}", human(*v));
    }
    Ok(())
}

fn human(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{n} ({:.2} B)", f / 1e9)
    } else if f >= 1e6 {
        format!("{n} ({:.2} M)", f / 1e6)
    } else {
        n.to_string()
    }
}

fn run_bench(a: BenchArgs) -> Result<()> {
    if let Some(max) = a.loader {
        if max == 0 {
            bail!("--loader needs at least one worker");
        }
        let mut counts: Vec<usize> =
            std::iter::successors(Some(1usize), |w| Some(w * 2)).take_while(|&w| w < max).collect();
        counts.push(max);
        let r = bench::loader(a.size, 128, &counts, 3.0, a.shards.as_deref())?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let device = tessera::parse_device(&a.device)?;
    let kind = tessera::parse_dtype(&a.dtype, device)?;
    if a.runs < 1 {
        bail!("--runs must be at least 1");
    }
    let opts = BenchOptions {
        device,
        kind,
        threads: a.threads,
        runs: a.runs,
        configs: a.configs,
        sample_batch: a.sample_batch,
        train_batch: a.train_batch,
        decode: DecodeMode::parse(&a.decode)?,
        distinct_captions: a.distinct_captions,
        bf16_weights: a.bf16_weights,
    };
    let report = bench::run(&opts, |m| eprintln!("bench: {m}"))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn world_export(n: u64, out: &Path, size: usize, seed: u64, held_out: bool) -> Result<()> {
    use tessera::world::{self, Split};
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let split = if held_out { Split::HeldOut } else { Split::Train };
    for i in 0..n {
        let scene = world::sample(seed, i, split);
        let name = format!("{i:06}");
        let img = image::RgbImage::from_raw(size as u32, size as u32, world::render(&scene, size)).context("render")?;
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        tessera::io::write_atomic(&out.join(format!("{name}.png")), &png)?;
        tessera::io::write_atomic(&out.join(format!("{name}.txt")), scene.caption.as_bytes())?;
        tessera::io::write_atomic(&out.join(format!("{name}.json")), serde_json::to_string_pretty(&scene)?.as_bytes())?;
    }
    eprintln!("wrote {n} scenes to {}", out.display());
    Ok(())
}

fn dvae_command(c: DvaeCommand) -> Result<()> {
    use tessera::codes::{DvaeOnly, TokenFile, write_png};
    let load = |at: &DvaeAt| -> Result<DvaeOnly> {
        if let Some(t) = at.threads {
            tch::set_num_threads(t as i32);
        }
        let device = tessera::parse_device(&at.device)?;
        DvaeOnly::load(&at.model, device).with_context(|| format!("loading the dVAE of {}", at.model.display()))
    };
    match c {
        DvaeCommand::Encode { image, out, at } => {
            let d = load(&at)?;
            let t = d.encode_file(&image)?;
            t.save(&out)?;
            eprintln!("{}: {}×{} codes of {} written to {}", image.display(), t.grid, t.grid, t.vocab, out.display());
        }
        DvaeCommand::Decode { tokens, out, at } => {
            let d = load(&at)?;
            let rgb = d.decode(&TokenFile::load(&tokens)?)?;
            write_png(&out, &rgb, d.image_size())?;
            eprintln!("{} px image written to {}", d.image_size(), out.display());
        }
        DvaeCommand::Roundtrip { image, out, at } => {
            let d = load(&at)?;
            let r = d.roundtrip(&image)?;
            let out = out.unwrap_or_else(|| {
                let stem =
                    image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
                PathBuf::from(format!("{stem}.roundtrip.png"))
            });
            write_png(&out, &r.reconstruction, d.image_size())?;
            println!(
                "{}",
                serde_json::json!({
                    "psnr_db": r.psnr_db, "encode_s": r.encode_s, "decode_s": r.decode_s,
                    "grid": r.tokens.grid, "vocab": r.tokens.vocab, "image_size": d.image_size(),
                    "out": out.display().to_string(),
                })
            );
            eprintln!(
                "{} through the dVAE: PSNR {:.2} dB (encode {:.2} s, decode {:.2} s); written to {}",
                image.display(),
                r.psnr_db,
                r.encode_s,
                r.decode_s,
                out.display()
            );
        }
    }
    Ok(())
}

fn prepare_dir(at: &ModelData) -> Result<()> {
    let dir = &at.dir;
    match at.preset.as_deref() {
        Some(p) => tessera::train::init_dir(dir, &Config::preset(p)?.with_settings(&at.settings)?)?,
        None if dir.join(tessera::model::CONFIG_FILE).exists() => {}
        None => bail!("{} has no config.json: give --preset to start a new model", dir.display()),
    }
    Ok(())
}

/// The training compute dtype `--dtype` names (`None`: f32), said on stderr when `auto` chose it
/// (`f32_only`: a trainer that computes in f32 whatever it is given, the reranker's, says so).
fn train_compute(name: &str, device: tch::Device, f32_only: bool) -> Result<Option<tch::Kind>> {
    let kind = tessera::parse_train_dtype(name, device)?;
    let compute = (kind != tch::Kind::Float).then_some(kind);
    if f32_only {
        if compute.is_some() || name == "auto" {
            eprintln!("training in f32 (the reranker trains in f32 whatever --dtype says)");
        }
    } else if name == "auto" {
        let why = if compute.is_some() { "the device computes it natively" } else { "no native bf16 here" };
        eprintln!("training in {} (--dtype auto: {why})", tessera::compute_name(compute));
    }
    Ok(compute)
}

fn train_options(c: &CommonTrain, f32_only: bool) -> Result<tessera::train::TrainOptions> {
    if let Some(t) = c.threads {
        tch::set_num_threads(t as i32);
    }
    prepare_dir(&c.at)?;
    let device = tessera::parse_device(&c.device)?;
    let compute = train_compute(&c.dtype, device, f32_only)?;
    if c.steps == 0 || c.batch == 0 || c.checkpoint_every == 0 || c.log_every == 0 {
        bail!("--steps, --batch, --checkpoint-every and --log-every must be at least 1");
    }
    let mut o = tessera::train::TrainOptions::new(&c.at.dir);
    o.data = c.at.data.clone();
    o.steps = c.steps;
    o.batch = c.batch;
    o.checkpoint_every = c.checkpoint_every;
    o.sample_every = c.sample_every;
    o.log_every = c.log_every;
    o.seed = c.seed;
    o.device = device;
    o.compute = compute;
    o.resume = c.resume;
    o.stop_after = c.stop_after;
    o.workers = c.workers;
    o.shards = c.shards.clone();
    o.weights_bf16 = c.bf16_weights;
    Ok(o)
}

/// The trainer's options; with `--time`, the steps that fill it (measured with `run`) and the
/// deadline.
fn timed_options(
    c: &CommonTrain,
    f32_only: bool,
    run: impl Fn(&tessera::train::TrainOptions) -> tessera::Result<tessera::train::TrainSummary>,
) -> Result<tessera::train::TrainOptions> {
    let mut o = train_options(c, f32_only)?;
    if let Some(time) = &c.time {
        let seconds = tessera::pipeline::parse_budget(time)?;
        let start = std::time::Instant::now();
        o.steps = tessera::pipeline::fit_steps(&o, seconds, run)?;
        o.deadline = Some(start + std::time::Duration::from_secs_f64(seconds));
        eprintln!(
            "--time {}: {} steps of {} fit (measured in {:.1}s)",
            tessera::train::fmt_secs(seconds),
            o.steps,
            o.batch,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(o)
}

fn train(t: TrainCommand) -> Result<()> {
    use tessera::train::{self as tr, DvaeRecipe, TransformerRecipe};
    let summary = match t {
        TrainCommand::Tokenizer { at, captions } => {
            prepare_dir(&at)?;
            let tok = tr::train_tokenizer(&at.dir, &at.data, captions)?;
            eprintln!("tokenizer with {} tokens written to {}", tok.vocab_size(), at.dir.display());
            return Ok(());
        }
        TrainCommand::Dvae {
            common,
            lr,
            lr_end,
            beta,
            beta_steps,
            tau_end,
            tau_steps,
            ema,
            usage_weight,
            hard_from,
            recon,
            decoder_only,
            decoder_hidden,
            decoder_blocks,
            init_from,
            argmax_codes,
            codebook,
            freeze_trunk,
        } => {
            let recipe = |steps: usize| {
                let schedule = tessera::dvae::DvaeSchedule {
                    beta_max: beta,
                    beta_steps,
                    tau_start: 1.0,
                    tau_end,
                    tau_steps,
                    lr_start: lr,
                    lr_end,
                    lr_steps: steps,
                };
                DvaeRecipe {
                    schedule,
                    ema,
                    decoder_only,
                    usage_weight,
                    hard_from,
                    recon,
                    decoder_hidden,
                    decoder_blocks,
                    init_from: init_from.clone(),
                    argmax_codes,
                    codebook,
                    freeze_trunk,
                    ..Default::default()
                }
            };
            let opts = timed_options(&common, false, |o| tr::train_dvae(o, &recipe(o.steps)))?;
            tr::train_dvae(&opts, &recipe(opts.steps))?
        }
        TrainCommand::Transformer { common, lr, warmup, ema, clip, init_from, codes_from } => {
            let recipe = TransformerRecipe { lr, warmup, ema, clip, init_from, codes_from, ..Default::default() };
            let opts = timed_options(&common, false, |o| tr::train_transformer(o, &recipe))?;
            tr::train_transformer(&opts, &recipe)?
        }
        TrainCommand::Reranker {
            common,
            lr,
            warmup,
            init_from,
            contrasts,
            contrast_images,
            through_dvae,
            near_contrasts,
            judged,
            judged_batch,
            judged_negatives,
        } => {
            let contrast_kind =
                if near_contrasts { tessera::world::Contrasts::Near } else { tessera::world::Contrasts::Any };
            let recipe = tr::RerankerRecipe {
                lr,
                warmup,
                init_from,
                contrasts,
                contrast_images,
                through_dvae,
                contrast_kind,
                judged,
                judged_batch,
                judged_negatives,
                judged_loaded: Default::default(),
            };
            let opts = timed_options(&common, true, |o| tr::train_reranker(o, &recipe))?;
            tr::train_reranker(&opts, &recipe)?
        }
        TrainCommand::Shards { at, per_shard, out, from_judged: Some(bank), .. } => {
            let model = Model::load(&at.dir, tch::Device::Cpu)?;
            let mark = tessera::shards::dvae_fingerprint(&at.dir.join(tessera::model::DVAE_FILE), &model.config.dvae)?;
            let out = out.unwrap_or_else(|| at.dir.join("shards"));
            let r = tessera::judged::write_right_shards(&model, &mark.codes, &bank, &out, per_shard)?;
            eprintln!(
                "{} right samples of {} in {} shards ({}{{00000..}}.tok in {}); {} parts left out",
                r.right,
                r.samples,
                r.files,
                tessera::judged::RIGHT_SHARD_PREFIX,
                out.display(),
                r.skipped.len()
            );
            return Ok(());
        }
        TrainCommand::Shards { at, examples, per_shard, batch, out, seed, device, workers, from_judged: None } => {
            prepare_dir(&at)?;
            if examples == 0 || per_shard == 0 || batch == 0 {
                bail!("--examples, --per-shard and --batch must be at least 1");
            }
            let mut o = tr::TrainOptions::new(&at.dir);
            o.data = at.data.clone();
            o.batch = batch;
            o.seed = seed;
            o.device = tessera::parse_device(&device)?;
            o.workers = workers;
            o.shards = out;
            let s = tr::encode_shards(&o, examples, per_shard)?;
            eprintln!();
            eprintln!(
                "{} examples in the shards ({} encoded now, {:.0} examples/s, waited for pictures {:.1}% of the time)",
                s.examples,
                s.encoded,
                s.examples_per_s,
                100.0 * s.data_wait
            );
            return Ok(());
        }
        TrainCommand::Judged { dir, scenes, per_scene, batch, out, seed, device, dtype, threads } => {
            if let Some(t) = threads {
                tch::set_num_threads(t as i32);
            }
            let device = tessera::parse_device(&device)?;
            let mut model = Model::load(&dir, device)?;
            model.set_dtype(tessera::parse_dtype(&dtype, device)?)?;
            let out = out.unwrap_or_else(|| dir.join("judged"));
            let o = tessera::judged::JudgedOptions {
                scenes,
                per_scene,
                batch,
                seed,
                sample: model.config.sampling.clone(),
            };
            let s = tessera::judged::draw(&model, &out, &o, |done, parts| {
                eprint!("\rjudged samples: part {done}/{parts}");
                let _ = std::io::stderr().flush();
            })?;
            eprintln!();
            eprintln!(
                "{} samples in {} parts ({} drawn now, {:.1} samples/s): {:.0}% right; {} scenes with a right and a wrong sample",
                s.samples,
                s.parts,
                s.drawn,
                s.samples_per_s,
                100.0 * s.right as f64 / s.samples.max(1) as f64,
                s.informative
            );
            return Ok(());
        }
        TrainCommand::All {
            at,
            budget,
            device,
            seed,
            resume,
            workers,
            threads,
            dvae_batch,
            transformer_batch,
            reranker_batch,
            eval_captions,
            eval_samples,
            usage_weight,
            beta,
            hard_tail,
            argmax_codes,
            recon,
            dtype,
            dvae_from,
            dvae_data,
            init_from,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t as i32);
            }
            let device = tessera::parse_device(&device)?;
            let budget = tessera::pipeline::parse_budget(&budget)?;
            let mut o = tessera::pipeline::AllOptions::new(&at.dir, budget, device);
            o.preset = at.preset.clone();
            o.settings = at.settings.clone();
            o.data = at.data.clone();
            o.seed = seed;
            o.resume = resume;
            o.workers = workers;
            o.dvae_batch = dvae_batch.unwrap_or(o.dvae_batch);
            o.transformer_batch = transformer_batch.unwrap_or(o.transformer_batch);
            o.reranker_batch = reranker_batch.unwrap_or(o.reranker_batch);
            o.eval_captions = eval_captions;
            o.eval_samples = eval_samples;
            if !(0.0..=1.0).contains(&hard_tail) || beta < 0.0 || usage_weight < 0.0 {
                bail!("--hard-tail must lie in [0, 1], --beta and --usage-weight must be ≥ 0");
            }
            if argmax_codes && hard_tail == 0.0 {
                bail!("--argmax-codes changes the straight-through steps: give --hard-tail too (1 = every step)");
            }
            o.dvae = tessera::pipeline::DvaeVariant { beta, usage_weight, hard_tail, recon, argmax_codes };
            // a refused data spec says so before anything is said about training
            tessera::pipeline::check_data(&o.data)?;
            o.compute = train_compute(&dtype, device, false)?;
            o.dvae_from = dvae_from;
            o.dvae_data = dvae_data;
            o.init_from = init_from;
            let plan = tessera::pipeline::train_all(&o)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
            eprintln!("model written to {} in {}", at.dir.display(), tessera::train::fmt_secs(plan.spent_s));
            return Ok(());
        }
    };
    eprintln!(
        "stopped at step {} (loss {:.4}, {:.1} examples/s, waited for data {:.1}% of the time, {} unreadable files skipped)",
        summary.step,
        summary.last_loss,
        summary.examples_per_s,
        100.0 * summary.data_wait,
        summary.skipped_files
    );
    Ok(())
}
