//! `llava-med`: run LLaVA-Med from the command line (generate, chat, serve, inspect, tokenize, logits,
//! render, anonymize, cache).

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use clap::{Args, Parser, Subcommand};
use image::DynamicImage;
use llava_med::device::{DeviceChoice, SelectedDevice, parse_dtype, select};
use llava_med::engine::Engine;
use llava_med::generate::{PromptCache, SamplingParams};
use llava_med::imaging::dicom::deid;
use llava_med::imaging::worker::DEFAULT_DECODE_TIMEOUT_S;
use llava_med::imaging::{
    DicomFile, DicomOptions, WindowChoice, is_dicom, open_any_with_time_limit, with_time_limit,
};
use llava_med::load_progress::LoadProgress;
use llava_med::memory_check;
use llava_med::prompt::{PromptTokenizer, Template};
use llava_med::quant::Quantization;
use llava_med::quant::cache::{self, CacheTally};
use llava_med::{IMAGE_SLOT, LlavaModel, LoadOptions, ModelConfig};

#[path = "llava-med/cache_command.rs"]
mod cache_command;
#[path = "llava-med/progress_line.rs"]
mod progress_line;

use progress_line::ProgressLine;

#[derive(Parser)]
#[command(
    name = "llava-med",
    version,
    about = "Chat with LLaVA-Med about medical images, locally"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// auto, cpu, wgpu, vulkan or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Float type: f32, f16 or bf16 (default: f32 on CPU, f16 on wgpu, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Context length in tokens (default: the model's).
    #[arg(long)]
    context: Option<usize>,
    /// Weight-only quantisation of the weight matrices: none, int8 or int4 (groups of 32, see the README);
    /// auto: on the CPU the finest that fits the available memory (none where the model fits), else none.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// Where quantised weights are kept between loads, so only the first load of a model quantises it
    /// (`off`: quantise at every load). Default: $LLAVA_MED_QUANT_CACHE, else ~/.cache/llava-med/quantized.
    #[arg(long, value_name = "DIR|off")]
    quant_cache: Option<String>,
    /// Load on the CPU even when the model looks too big for the available memory (or for
    /// $LLAVA_MED_MEMORY_LIMIT).
    #[arg(long)]
    ignore_memory_check: bool,
}

impl DeviceArgs {
    /// The device, float type and quantisation these flags ask for, to load the model of `config` from
    /// `model` (a folder, or a description of random weights).
    fn select(&self, config: &ModelConfig, model: &Path) -> Result<(SelectedDevice, Quantization)> {
        let choice: DeviceChoice = self.device.parse()?;
        let dtype = self.dtype.as_deref().map(parse_dtype).transpose()?;
        let selected = select(choice, dtype)?;
        let quant = match self.quant.trim().to_ascii_lowercase().as_str() {
            "auto" => self.auto_quantization(&selected, config, model)?,
            asked => asked.parse()?,
        };
        let (selected, note) = selected.for_quantization(quant);
        if let Some(note) = note {
            eprintln!("note: {note}");
        }
        // The load checks again; checked here too so a refusal comes before any note about the load.
        if selected.kind == DeviceChoice::Cpu
            && !self.ignore_memory_check
            && let Some(available) = memory_check::available()?
        {
            memory_check::check(model, config, selected.dtype, quant, available)
                .map_err(load_error)?;
        }
        Ok((selected, quant))
    }

    /// `--quant auto`: on the CPU, the finest quantisation whose weights fit the available memory
    /// (`none` where they do); elsewhere `none` (device memory is not checked).
    fn auto_quantization(
        &self,
        selected: &SelectedDevice,
        config: &ModelConfig,
        model: &Path,
    ) -> Result<Quantization> {
        if selected.kind != DeviceChoice::Cpu || self.ignore_memory_check {
            return Ok(Quantization::None);
        }
        let Some(available) = memory_check::available()? else {
            return Ok(Quantization::None);
        };
        // Quantised weights compute in f32 on the CPU (`SelectedDevice::for_quantization`).
        let dtype = |q| match q {
            Quantization::None => selected.dtype,
            _ => DType::F32,
        };
        let quant = memory_check::finest_fitting(config, available, dtype);
        let fits = memory_check::needed(config, dtype(quant), quant) <= available;
        if quant != Quantization::None && fits {
            let gb = |q| memory_check::needed(config, dtype(q), q) as f64 / 1e9;
            eprintln!(
                "note: {}: unquantised it needs about {:.1} GB of memory and {:.1} GB is available; \
                 loading it with {quant} weights (about {:.1} GB; --quant none to insist)",
                model.display(),
                gb(Quantization::None),
                available as f64 / 1e9,
                gb(quant)
            );
        }
        Ok(quant)
    }

    /// The quantised-weights cache's root folder these flags ask for, if any.
    fn quant_cache(&self) -> Option<PathBuf> {
        match &self.quant_cache {
            Some(value) => cache::parse_root(value),
            None => cache::default_root(),
        }
    }
}

/// Tells the user, before a quantised load that has nothing cached yet, why it takes minutes this once.
fn note_first_quantisation(model: &Path, quant: Quantization, root: Option<&Path>) {
    let Some(root) = root.filter(|_| quant != Quantization::None) else {
        return;
    };
    let cache = cache::QuantCache::for_model(root, model);
    if !cache.dir().is_dir() {
        eprintln!(
            "note: first load of {} with --quant {quant}: quantising it (minutes for a 7B model); the \
             packed weights are kept in {} so later loads read them (`llava-med cache list` shows them; --quant-cache off: never kept)",
            model.display(),
            cache.dir().display()
        );
    }
}

/// A progress line on stderr for loading `model`, and the progress it shows; none when stderr is not a
/// terminal (logs and pipes get no line).
fn load_progress_line(model: &Path) -> Option<(Arc<ProgressLine>, Arc<LoadProgress>)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let name = model.file_name().unwrap_or(model.as_os_str());
    let line = Arc::new(ProgressLine::new(format!(
        "loading {}",
        name.to_string_lossy()
    )));
    let shown = line.clone();
    let progress = LoadProgress::new(move |done, total| shown.show(done, total));
    Some((line, Arc::new(progress)))
}

/// The load options `args` ask for (with `context`), with a progress bar for loading `model` on a
/// terminal.
fn load_options(
    model: &Path,
    args: &DeviceArgs,
    quant: Quantization,
    context: Option<usize>,
) -> (LoadOptions, Option<Arc<ProgressLine>>) {
    let (bar, progress) = load_progress_line(model).unzip();
    let options = LoadOptions {
        max_context: context,
        quantization: quant,
        quant_cache: args.quant_cache(),
        progress,
        ignore_memory_check: args.ignore_memory_check,
    };
    (options, bar)
}

/// A load's error, with the flag that overrides the memory check when that refused it.
fn load_error(e: llava_med::Error) -> anyhow::Error {
    match e {
        llava_med::Error::Memory { .. } => {
            anyhow::anyhow!("{e} (--ignore-memory-check loads it anyway)")
        }
        e => e.into(),
    }
}

/// Logs what a load did with the quantised-weights cache.
fn log_cache(root: Option<&Path>, tally: Option<&CacheTally>) {
    if let (Some(root), Some(tally)) = (root, tally) {
        tracing::info!("quantised-weights cache in {}: {tally}", root.display());
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Conversation template (mistral_instruct, vicuna_v1, llava_v1, plain, chatml); default: the model's.
    #[arg(long)]
    template: Option<String>,
    /// System prompt replacing the template's.
    #[arg(long)]
    system: Option<String>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Most new tokens.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Clone)]
struct ImageArgs {
    /// Image: PNG, JPEG, TIFF or DICOM.
    #[arg(long)]
    image: Option<PathBuf>,
    /// DICOM frame to use, 0-based (default 0).
    #[arg(long)]
    frame: Option<usize>,
    /// Window for DICOM and 16-bit grey images: default (the file's), auto, soft-tissue, lung, bone,
    /// brain, liver, or CENTER,WIDTH.
    #[arg(long, allow_hyphen_values = true)]
    window: Option<String>,
    /// Give up decoding the image after this many seconds.
    #[arg(long, default_value_t = DEFAULT_DECODE_TIMEOUT_S)]
    decode_timeout_s: f64,
}

/// The `--decode-timeout-s` value as a duration.
fn decode_limit(seconds: f64) -> Result<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(limit) if !limit.is_zero() => Ok(limit),
        _ => bail!("--decode-timeout-s must be a positive number of seconds, not {seconds}"),
    }
}

impl ImageArgs {
    fn window(&self) -> Result<Option<WindowChoice>> {
        self.window
            .as_deref()
            .map(|w| w.parse::<WindowChoice>().map_err(anyhow::Error::msg))
            .transpose()
    }

    /// Opens `path` with this frame and window.
    fn open(&self, path: &Path) -> Result<DynamicImage> {
        Ok(open_any_with_time_limit(
            path,
            self.frame,
            self.window()?,
            DicomOptions::default(),
            decode_limit(self.decode_timeout_s)?,
        )?)
    }

    /// The image given with `--image`, if any.
    fn load(&self) -> Result<Option<DynamicImage>> {
        if self.image.is_none() && (self.frame.is_some() || self.window.is_some()) {
            bail!("--frame and --window need --image");
        }
        self.image.as_deref().map(|p| self.open(p)).transpose()
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to listen on; anything but loopback needs --api-key-env.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port; 0 picks a free one (reported in the ready line on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Name of an environment variable holding the API key every request must send as a bearer token.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Requests that may wait behind the running one; more get 429.
    #[arg(long, default_value_t = 8)]
    max_queue: usize,
    /// Largest image in a request, in MB.
    #[arg(long, default_value_t = 32)]
    max_image_mb: usize,
    /// Accept file:// image URLs (paths on this machine).
    #[arg(long)]
    allow_local_files: bool,
    /// Shut down when stdin is closed (for a supervising parent process).
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Log prompt text (off by default: prompts may hold patient information).
    #[arg(long)]
    log_prompts: bool,
    /// Model id clients use (default: the model folder's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Conversation template (default: the model's).
    #[arg(long)]
    template: Option<String>,
    /// Give up decoding one image after this many seconds.
    #[arg(long, default_value_t = DEFAULT_DECODE_TIMEOUT_S)]
    decode_timeout_s: f64,
    /// Seconds a running generation may go on after SIGTERM before it is cancelled.
    #[arg(long, default_value_t = 2.0)]
    shutdown_grace_s: f64,
    /// Conversations whose positions (earlier turns, images) are kept in memory between requests so their
    /// next turns compute only what is new; each holds a context's KV cache.
    #[arg(long, default_value_t = 1)]
    prompt_cache_slots: usize,
    /// Compute every request from scratch and keep nothing between requests (= --prompt-cache-slots 0).
    #[arg(long, conflicts_with = "prompt_cache_slots")]
    no_prompt_cache: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one question about an image, streaming the answer to stdout.
    Generate {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        image: ImageArgs,
        /// The question.
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Print one JSON object (text, finish reason, token counts) instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).
    Serve(ServeArgs),
    /// Measure load, vision, prefill, decode (by default at context 128/512/2048), time to first token and
    /// memory.
    Bench {
        /// Model folder.
        #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
        model: Option<PathBuf>,
        /// A named shape with random weights instead of a model: tiny, base or 7b.
        #[arg(long)]
        shape: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Prompt length for the prefill figure.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens decoded per decode run.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Timed runs per figure (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Contexts at which decoding is timed, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = llava_med::bench::DECODE_CONTEXTS)]
        contexts: Vec<usize>,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Interactive multi-turn chat in the terminal (`/image PATH`, `/reset`, `/quit`).
    Chat {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// Image to start with (`--frame`/`--window` also apply to `/image`).
        #[command(flatten)]
        image: ImageArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Describe a model folder: layout, architecture, parameters, dtype, vision tower source.
    Inspect {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Print the token ids of a prompt as JSON (-200 = image slot).
    Tokenize {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// Prompt text; `<image>` marks the image.
        #[arg(long)]
        prompt: String,
        /// Render the prompt as a single user turn of this template first.
        #[arg(long)]
        template: Option<String>,
    },
    /// One forward pass without a template; writes logits, image features and pixel values.
    Logits {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        image: ImageArgs,
        /// Raw prompt (tokenised like LLaVA, `<image>` = image slot).
        #[arg(long, conflicts_with = "input_ids")]
        prompt: Option<String>,
        /// Comma-separated ids; -200 = one image slot.
        #[arg(long)]
        input_ids: Option<String>,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Render an image (a DICOM frame through its window) to the 8-bit PNG the model would see.
    Render {
        /// Image: DICOM, PNG, JPEG or TIFF.
        #[arg(long)]
        image: PathBuf,
        /// DICOM frame, 0-based (default 0).
        #[arg(long)]
        frame: Option<usize>,
        /// default (the file's), auto, soft-tissue, lung, bone, brain, liver, or CENTER,WIDTH.
        #[arg(long, allow_hyphen_values = true)]
        window: Option<String>,
        /// Output PNG (default: the image's file stem + `.png` in the current folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Give up decoding after this many seconds.
        #[arg(long, default_value_t = DEFAULT_DECODE_TIMEOUT_S)]
        decode_timeout_s: f64,
    },
    /// De-identify a DICOM file (PS3.15 Basic Application Level Confidentiality Profile). Text burned
    /// into the pixels is not removed: a warning says when the file declares it or may have it.
    Anonymize {
        /// DICOM file to de-identify.
        input: PathBuf,
        /// De-identified DICOM file to write.
        output: PathBuf,
        /// Secret mixed into the new UIDs (the same salt maps the same study to the same new UIDs).
        #[arg(long, default_value = "")]
        uid_salt: String,
    },
    /// List or remove the quantised weights kept between loads (`--quant-cache`).
    Cache {
        #[command(subcommand)]
        action: cache_command::CacheAction,
        /// The cache's root folder. Default: $LLAVA_MED_QUANT_CACHE, else ~/.cache/llava-med/quantized.
        #[arg(long, global = true, value_name = "DIR")]
        quant_cache: Option<String>,
    },
}

fn main() -> ExitCode {
    // Mesa's EGL otherwise probes Wayland/X11 when wgpu lists OpenGL adapters and prints errors about a
    // missing display; compute needs none. Set before any thread exists.
    if std::env::var_os("EGL_PLATFORM").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("EGL_PLATFORM", "surfaceless") };
    }
    // Activations' buffers reused rather than faulted in afresh each time (`host_memory`).
    llava_med::host_memory::keep_freed_blocks();
    let cli = Cli::parse();
    // Our own warnings by default (the server also logs each request); `LLAVA_MED_LOG=debug` (or any
    // EnvFilter directive) for more.
    let default_filter = match cli.command {
        Command::Serve(_) => "llava_med=info",
        _ => "llava_med=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLAVA_MED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            model,
            image,
            prompt,
            sampling,
            device,
            json,
        } => {
            let engine = load(&model, &device)?;
            let images: Vec<DynamicImage> = image.load()?.into_iter().collect();
            let template = template(&engine, sampling.template.as_deref())?;
            let mut out = std::io::stdout().lock();
            let g = engine.answer(
                &mut PromptCache::disabled(),
                template,
                sampling.system.as_deref(),
                &[(prompt, None)],
                &images,
                sampling_params(&sampling),
                sampling.max_new_tokens,
                |piece| {
                    if !json {
                        let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
                    }
                    ControlFlow::Continue(())
                },
            )?;
            if json {
                let finish = match g.finish {
                    llava_med::generate::FinishReason::Length => "length",
                    _ => "stop",
                };
                let value = serde_json::json!({"text": g.text, "finish_reason": finish,
                    "prompt_tokens": g.prompt_positions, "completion_tokens": g.tokens.len()});
                writeln!(out, "{value}")?;
            } else {
                writeln!(out)?;
            }
            Ok(())
        }
        Command::Serve(args) => serve(args),
        Command::Bench {
            model,
            shape,
            device,
            prompt_tokens,
            new_tokens,
            runs,
            contexts,
            json,
        } => bench(
            model.as_deref(),
            shape.as_deref(),
            &device,
            &llava_med::bench::BenchOptions {
                prompt_tokens,
                new_tokens,
                runs,
                contexts,
            },
            json,
        ),
        Command::Chat {
            model,
            image,
            sampling,
            device,
        } => chat(&model, image, &sampling, &device),
        Command::Inspect { model, device } => inspect(&model, &device),
        Command::Tokenize {
            model,
            prompt,
            template,
        } => {
            let tok = PromptTokenizer::from_dir(&model)?;
            let text = match template {
                Some(name) => name.parse::<Template>()?.render(None, &[(prompt, None)]),
                None => prompt,
            };
            println!("{}", serde_json::to_string(&tok.encode_prompt(&text)?)?);
            Ok(())
        }
        Command::Logits {
            model,
            image,
            prompt,
            input_ids,
            out,
            device,
        } => logits(&model, &image, prompt, input_ids, &out, &device),
        Command::Render {
            image,
            frame,
            window,
            out,
            decode_timeout_s,
        } => render(
            &image,
            frame,
            window.as_deref(),
            out,
            decode_limit(decode_timeout_s)?,
        ),
        Command::Anonymize {
            input,
            output,
            uid_salt,
        } => anonymize(&input, &output, uid_salt),
        Command::Cache {
            action,
            quant_cache,
        } => cache_command::run(action, quant_cache.as_deref()),
    }
}

fn load(model: &Path, args: &DeviceArgs) -> Result<Engine> {
    let (selected, quant) = args.select(&ModelConfig::from_dir(model)?, model)?;
    tracing::info!(device = %selected.kind, dtype = ?selected.dtype, %quant, "loading {}", model.display());
    let cache = args.quant_cache();
    note_first_quantisation(model, quant, cache.as_deref());
    let (options, bar) = load_options(model, args, quant, args.context);
    let engine = Engine::load_with(model, selected, &options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let engine = engine.map_err(load_error)?;
    log_cache(cache.as_deref(), engine.model.quant_cache.as_ref());
    Ok(engine)
}

fn template(engine: &Engine, name: Option<&str>) -> Result<Template> {
    Ok(match name {
        Some(n) => n.parse()?,
        None => engine.template,
    })
}

fn sampling_params(s: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
    }
}

fn bench(
    model: Option<&Path>,
    shape: Option<&str>,
    args: &DeviceArgs,
    options: &llava_med::bench::BenchOptions,
    json: bool,
) -> Result<()> {
    let config = match (model, shape) {
        (Some(dir), _) => ModelConfig::from_dir(dir)?,
        (None, Some(name)) => llava_med::bench::shape_config(name)?,
        (None, None) => bail!("give --model DIR or --shape NAME"),
    };
    let label = match (model, shape) {
        (Some(dir), _) => dir.to_path_buf(),
        _ => PathBuf::from(format!("the {} shape", shape.unwrap_or_default())),
    };
    let (selected, quant) = args.select(&config, &label)?;
    // Checked before loading, which takes minutes for a quantised 7B model.
    let needed = llava_med::bench::min_context(&config, options);
    // Room for the longest decode figure, not the model's whole context (a 32k KV cache would dominate
    // the memory figures).
    let context = match args.context {
        Some(c) if c < needed => bail!(
            "--context {c} is too short for bench: it needs {needed} positions (the --prompt-tokens prompt \
             and its next token, and for the time to first token one image, a 45-token question and a \
             45-token follow-up)"
        ),
        Some(c) => c,
        None => (options.longest_decode() + 64).max(needed),
    };
    let cache = args.quant_cache();
    if let Some(dir) = model {
        note_first_quantisation(dir, quant, cache.as_deref());
    }
    let start = std::time::Instant::now();
    let loaded = match model {
        Some(dir) => {
            let (options, bar) = load_options(dir, args, quant, Some(context));
            let loaded = LlavaModel::load_with(dir, &selected.device, selected.dtype, &options);
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            loaded.map_err(load_error)?
        }
        None => LlavaModel::random(
            config,
            &selected.device,
            selected.dtype,
            Some(context),
            quant,
        )?,
    };
    let load_s = start.elapsed().as_secs_f64();
    tracing::info!(load_s, "bench: model ready");
    log_cache(cache.as_deref(), loaded.quant_cache.as_ref());
    let mut report = llava_med::bench::run(&loaded, load_s, options)?;
    report["shape"] = serde_json::json!(shape);
    report["model"] = serde_json::json!(model.map(|m| m.display().to_string()));
    report["device"] = serde_json::json!(selected.kind.to_string());
    // Which GPU wgpu found, for the record (a benchmark on lavapipe reads very differently).
    #[cfg(feature = "wgpu")]
    if selected.kind == llava_med::device::DeviceChoice::Wgpu {
        report["adapter"] = serde_json::json!(llava_med::device::gpu_adapter());
    }
    report["dtype"] = serde_json::json!(format!("{:?}", selected.dtype).to_lowercase());
    report["quantization"] = serde_json::json!(quant.to_string());
    // A load that read the cache measures reading packed weights, not converting and quantising them.
    report["quant_cache"] = serde_json::json!(loaded.quant_cache);
    report["threads"] =
        serde_json::json!(std::thread::available_parallelism().map_or(1, usize::from));
    report["date"] = serde_json::json!(utc_now());
    if json {
        println!("{report}");
        return Ok(());
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The current UTC time as ISO 8601 (seconds).
fn utc_now() -> String {
    utc_iso(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// A time in seconds since the Unix epoch as ISO 8601 UTC.
fn utc_iso(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn serve(args: ServeArgs) -> Result<()> {
    let api_key = match &args.api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Some(key.trim().to_string()),
            _ => bail!("--api-key-env {var}: the environment variable {var} is not set or empty"),
        },
        None => None,
    };
    let template = args
        .template
        .as_deref()
        .map(str::parse::<Template>)
        .transpose()?;
    let model_name = match args.model_name.clone() {
        Some(n) => n,
        None => args
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .with_context(|| format!("{}: model folder not found", args.model.display()))?,
    };
    let options = llava_med::serve::ServeOptions {
        host: args.host.clone(),
        port: args.port,
        api_key,
        max_queue: args.max_queue,
        max_image_bytes: args.max_image_mb.saturating_mul(1 << 20),
        allow_local_files: args.allow_local_files,
        log_prompts: args.log_prompts,
        model_name,
        template,
        decode_timeout: decode_limit(args.decode_timeout_s)?,
        shutdown_grace: Duration::try_from_secs_f64(args.shutdown_grace_s)
            .context("--shutdown-grace-s must be a number of seconds")?,
        exit_on_stdin_eof: args.exit_on_stdin_eof,
        prompt_cache_slots: if args.no_prompt_cache {
            0
        } else {
            args.prompt_cache_slots
        },
    };
    options.check()?;
    let engine = load(&args.model, &args.device)?;
    llava_med::serve::run(engine, options)?;
    Ok(())
}

fn chat(
    model: &Path,
    image: ImageArgs,
    sampling: &SamplingArgs,
    device: &DeviceArgs,
) -> Result<()> {
    let mut images: Vec<DynamicImage> = image.load()?.into_iter().collect();
    let engine = load(model, device)?;
    let template = template(&engine, sampling.template.as_deref())?;
    let mut turns: Vec<(String, Option<String>)> = Vec::new();
    // Each turn resends the whole conversation; the cache computes only what the last turn added.
    let mut cache = PromptCache::new();
    eprintln!(
        "llava-med chat ({template}); /image PATH attaches an image, /reset starts over, /quit ends."
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            return Ok(());
        }
        if line == "/reset" {
            turns.clear();
            images.clear();
            continue;
        }
        if let Some(path) = line.strip_prefix("/image") {
            match image.open(Path::new(path.trim())) {
                Ok(img) => {
                    // LLaVA-Med sees one image at the start of the conversation: a new image starts over.
                    images = vec![img];
                    turns.clear();
                    eprintln!("image attached; conversation restarted");
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        turns.push((line.to_string(), None));
        let result = engine.answer(
            &mut cache,
            template,
            sampling.system.as_deref(),
            &turns,
            &images,
            sampling_params(sampling),
            sampling.max_new_tokens,
            |piece| {
                let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
                ControlFlow::Continue(())
            },
        );
        println!();
        match result {
            Ok(g) => turns.last_mut().expect("pushed").1 = Some(g.text.trim().to_string()),
            Err(e) => {
                turns.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

fn inspect(model: &Path, device: &DeviceArgs) -> Result<()> {
    let engine = load(model, device)?;
    let m = &engine.model;
    let c = &m.config;
    let (lm, tower, proj) = m.num_params();
    println!("model folder:     {}", model.display());
    println!(
        "layout:           {:?} (model_type {})",
        c.layout, c.model_type
    );
    println!(
        "language model:   {:?}, {} layers, hidden {}, {} heads / {} kv heads, MLP {}, vocab {}, rope θ {}, tied head {}",
        c.text.kind,
        c.text.num_layers,
        c.text.hidden_size,
        c.text.num_heads,
        c.text.num_kv_heads,
        c.text.intermediate_size,
        c.text.vocab_size,
        c.text.rope_theta,
        c.text.tie_word_embeddings
    );
    if let Some(mm) = &c.multimodal {
        let v = &mm.vision;
        println!(
            "vision tower:     CLIP ViT {}px/{} hidden {}, {} of {} layers used (select layer {}), {} image tokens",
            v.image_size,
            v.patch_size,
            v.hidden_size,
            mm.vision_layers_used(),
            v.num_layers,
            mm.select_layer,
            mm.tokens_per_image()
        );
        println!("vision config:    {:?}", mm.vision_source);
        println!(
            "vision weights:   {:?}",
            m.vision_weights.as_ref().expect("multimodal")
        );
        println!("projector:        {:?}", mm.projector);
    }
    println!(
        "parameters:       {} language model + {} vision + {} projector = {}",
        lm,
        tower,
        proj,
        lm + tower + proj
    );
    println!(
        "stored dtype:     {} (config says {})",
        m.stored_dtype.as_deref().unwrap_or("?"),
        c.torch_dtype.as_deref().unwrap_or("nothing")
    );
    println!(
        "loaded as:        {:?} on {}, decoder linear weights {}",
        engine.device.dtype, engine.device.kind, m.quantization
    );
    println!("context:          {} tokens", m.lm.max_positions());
    println!("template:         {}", engine.template);
    println!("tokenizer:        {}", engine.tokenizer.source().display());
    if let Some(mb) = llava_med::bench::peak_host_mb() {
        println!("peak memory:      {mb:.0} MB resident (this process, loading included)");
    }
    if !m.skipped_tensors.is_empty() {
        println!(
            "not loaded:       {} tensors the model never uses (e.g. {})",
            m.skipped_tensors.len(),
            m.skipped_tensors[0]
        );
    }
    Ok(())
}

fn logits(
    model: &Path,
    image: &ImageArgs,
    prompt: Option<String>,
    input_ids: Option<String>,
    out: &Path,
    device: &DeviceArgs,
) -> Result<()> {
    let loaded = image.load()?;
    let engine = load(model, device)?;
    let ids: Vec<i64> = match (prompt, input_ids) {
        (Some(p), None) => engine.tokenizer.encode_prompt(&p)?,
        (None, Some(s)) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<i64>()
                    .with_context(|| format!("--input-ids: `{x}` is not an integer"))
            })
            .collect::<Result<_>>()?,
        _ => bail!("give exactly one of --prompt or --input-ids"),
    };
    let mut tensors: Vec<(&str, Vec<f32>, Vec<usize>)> = Vec::new();
    let features = match loaded {
        Some(img) => {
            let pre = engine.preprocess().context("this model takes no images")?;
            let pixels = pre.batch(std::slice::from_ref(&img), &engine.device.device);
            let hidden = engine.model.vision_hidden(pixels.clone())?;
            let feats = engine.model.encode_images(pixels.clone())?;
            tensors.push((
                "pixel_values",
                to_vec(pixels.clone().squeeze_dim::<3>(0)),
                vec![3, pre.size, pre.size],
            ));
            let hd = hidden.dims();
            tensors.push(("vision_hidden", to_vec(hidden), vec![hd[1], hd[2]]));
            let fd = feats.dims();
            tensors.push((
                "image_features",
                to_vec(feats.clone()),
                vec![fd[0] * fd[1], fd[2]],
            ));
            Some(feats)
        }
        None => None,
    };
    if ids.contains(&IMAGE_SLOT) && features.is_none() {
        bail!("the prompt has an image slot (-200 / <image>) but no --image was given");
    }
    let mut cache = engine.model.new_cache();
    let embeds = engine.model.embed_sequence(&ids, features.as_ref())?;
    let logits = engine.model.forward(embeds, &mut cache)?;
    let [_, s, v] = logits.dims();
    tensors.push(("logits", to_vec(logits), vec![s, v]));
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, vals, shape)| {
            (
                n.to_string(),
                vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
                shape,
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, shape)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None)?;
    std::fs::write(out, data).with_context(|| format!("{}: cannot write", out.display()))?;
    eprintln!("wrote {} ({} positions, vocab {})", out.display(), s, v);
    Ok(())
}

fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32")
}

fn render(
    image: &Path,
    frame: Option<usize>,
    window: Option<&str>,
    out: Option<PathBuf>,
    limit: Duration,
) -> Result<()> {
    let choice = window
        .map(|w| w.parse::<WindowChoice>().map_err(anyhow::Error::msg))
        .transpose()?;
    let out = match out {
        Some(o) => o,
        None => {
            let stem = image
                .file_stem()
                .with_context(|| format!("{}: no file name", image.display()))?;
            let mut name = stem.to_os_string();
            name.push(".png");
            PathBuf::from(name)
        }
    };
    if out == image {
        bail!(
            "{}: the output would overwrite the input; give --out",
            out.display()
        );
    }
    let rendered = if is_dicom(image) {
        let (frame, window) = (frame.unwrap_or(0), choice.unwrap_or(WindowChoice::Default));
        let path = image.to_path_buf();
        let (summary, r) = with_time_limit(image, limit, move || {
            let file = DicomFile::open(&path, DicomOptions::default())?;
            Ok((file.summary(), file.render(frame, window)?))
        })?;
        eprintln!("{}: {summary}", image.display());
        if r.voi_lut {
            eprintln!("window: the file's VOI LUT");
        } else if !matches!(r.image, DynamicImage::ImageRgb8(_)) {
            eprintln!("window: {}", r.window);
        }
        r.image
    } else {
        open_any_with_time_limit(image, frame, choice, DicomOptions::default(), limit)?
    };
    rendered
        .save_with_format(&out, image::ImageFormat::Png)
        .with_context(|| format!("{}: cannot write PNG", out.display()))?;
    eprintln!(
        "wrote {} ({}×{})",
        out.display(),
        rendered.width(),
        rendered.height()
    );
    Ok(())
}

fn anonymize(input: &Path, output: &Path, uid_salt: String) -> Result<()> {
    let same = output == input
        || matches!(
            (input.canonicalize(), output.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        );
    if same {
        bail!("{}: the output would overwrite the input", output.display());
    }
    let report = deid::anonymize_file(input, output, &deid::DeidOptions { uid_salt })?;
    eprintln!(
        "wrote {}: {} attributes removed, {} emptied, {} dummy values, {} UIDs replaced, {} private attributes removed",
        output.display(),
        report.removed,
        report.emptied,
        report.dummied,
        report.uids_replaced,
        report.private_removed
    );
    if let Some(w) = report.burned_in_warning() {
        eprintln!("warning: {}: {w}", input.display());
    }
    Ok(())
}
