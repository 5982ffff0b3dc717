//! The `charter` commands: here the arguments (clap), the dispatch and the prelude every
//! command shares (configuration, logging, runtime); each command's body is in a file of
//! its own. Subcommands are documented in README.md and by `--help`.

mod bench;
mod calibrate;
mod check;
mod eval;
mod healthcheck;
mod keys;
mod migrate;
mod serve;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use charter::config::{Config, LogFormat};
use charter::engine::Engine;
use charter::quality::Data;

#[derive(Parser)]
#[command(
    name = "charter",
    version,
    about = "Constitutional-rules evaluation service"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve {
        /// Listen address (overrides server.bind).
        #[arg(long, value_name = "ADDR:PORT")]
        bind: Option<std::net::SocketAddr>,
        /// TOML configuration file (between the defaults and CHARTER__* variables).
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG")]
        config: Option<PathBuf>,
        /// Audit database (overrides database.url): sqlite://FILE?mode=rwc or
        /// postgres://USER@HOST/DB.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Apply the audit database's migrations and exit (serve also applies them at start
    /// unless database.migrate = false).
    Migrate {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Audit database (overrides database.url).
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Manage API keys (kept hashed in the audit database, so every replica knows them).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// Audit database (overrides database.url).
        #[arg(long, value_name = "URL", global = true)]
        database_url: Option<String>,
    },
    /// Validate constitution files; exit 1 and print every error when one is invalid.
    Check {
        /// Constitution TOML files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Evaluate texts from a file (or stdin): JSONL lines with "id" and "text", or plain
    /// text lines. Writes one JSON line per input to stdout.
    Eval {
        /// Constitution id (default: constitutions.default).
        #[arg(long)]
        constitution: Option<String>,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG")]
        config: Option<PathBuf>,
        /// Input file; stdin when absent or "-".
        file: Option<PathBuf>,
    },
    /// Measure verdict quality on labelled JSONL (id, text, label = violation|ok, lang,
    /// kind, category, source) with grouped 5-fold cross-validation; writes report.json and
    /// report.png into --out and prints a summary.
    Bench {
        #[command(flatten)]
        files: DataArgs,
        /// Constitution id (default: constitutions.default).
        #[arg(long)]
        constitution: Option<String>,
        /// Folder for report.json and report.png.
        #[arg(long, value_name = "DIR", default_value = "bench-report")]
        out: PathBuf,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Fit a constitution's learned heads and thresholds for the configured model (both
    /// models and their ensemble threshold with model.ensemble) on labelled JSONL and write
    /// <stem>.calibration.json, or <stem>.calibration.<model>.json when that file holds
    /// another model's, beside it (its version changes with it).
    Calibrate {
        /// Constitution id (default: constitutions.default).
        #[arg(long)]
        constitution: Option<String>,
        #[command(flatten)]
        files: DataArgs,
        /// With --ordinary: raise the threshold until at most this share of the ordinary
        /// items of each language fail out of fold, and twice it of the hard ones
        /// (refusals); the recall it leaves is printed.
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_ordinary_fpr: Option<f64>,
        /// Sample weight of ordinary items in the heads' fit.
        #[arg(long, value_name = "W", default_value_t = 1.0, value_parser = parse_weight)]
        ordinary_weight: f64,
        /// Also write every item's out-of-fold margins here (the `items.jsonl` format of
        /// bench; thresholds are the fitted ones, so rates read off it are in-sample).
        #[arg(long, value_name = "FILE")]
        oof_items: Option<PathBuf>,
        /// Added to the fitted shared threshold (`--scorer head`): for a model whose
        /// encoder was fine-tuned on this data, the shift measured on texts it never saw
        /// (tools/tune_cv.py writes it; the printed figures are then in-sample).
        #[arg(
            long,
            value_name = "LOGIT",
            default_value_t = 0.0,
            allow_negative_numbers = true
        )]
        threshold_offset: f32,
        /// f1 (best F1), fpr=RATE (highest recall at most this false-positive rate) or
        /// recall=RATE (highest threshold reaching this recall).
        #[arg(long, default_value = "recall=0.79")]
        target: charter::evaluate::metrics::Target,
        /// What to fit: `head` (a learned head per rule and a shared logit threshold) or
        /// `knn` (a shared threshold on the exemplar kNN scores).
        #[arg(long, default_value = "head", value_parser = ["head", "knn"])]
        scorer: String,
        /// Sample weight of safe-but-scary ok items (ids with `xstest` or `antibias`) in the
        /// heads' fit; higher trades ranking quality for fewer false alarms on them. `W`
        /// for every model, or `MODEL=W,...` with an optional bare `W` for the others.
        #[arg(long, value_name = "WEIGHTS", default_value = charter::evaluate::head::SCARY_WEIGHTS)]
        scary_weight: charter::quality::ScaryWeights,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Probe a running service's /readyz (for container health checks); exit 0 when ready.
    Healthcheck {
        /// Service address. Default: `server.bind` of the same configuration `serve` reads
        /// (defaults < `--config` < `CHARTER__*`), probed on loopback when it is 0.0.0.0 or ::.
        #[arg(long, value_name = "ADDR:PORT", env = "CHARTER_HEALTHCHECK_ADDR")]
        addr: Option<std::net::SocketAddr>,
        /// TOML configuration file, as given to `serve`.
        #[arg(long, value_name = "FILE", env = "CHARTER_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it, once, on stdout.
    Create(keys::CreateArgs),
    /// List every key (never the key or its hash).
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id (`key_...`); every replica refuses it within auth.cache_secs.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { files } => check::check(&files),
        Command::Healthcheck { addr, config } => {
            let addr = match addr {
                Some(addr) => addr,
                None => match load_config(config.as_deref()) {
                    Ok(c) => healthcheck::probe_addr(c.server.bind),
                    Err(code) => return code,
                },
            };
            healthcheck::healthcheck(addr)
        }
        Command::Serve {
            bind,
            config,
            database_url,
        } => with_config(
            config.as_deref(),
            |config| {
                if let Some(bind) = bind {
                    config.server.bind = bind;
                }
                set_database_url(config, database_url)
            },
            |config| runtime().block_on(serve::serve(config)),
        ),
        Command::Migrate {
            config,
            database_url,
        } => with_config(
            config.as_deref(),
            |config| set_database_url(config, database_url),
            |config| runtime().block_on(migrate::migrate(config)),
        ),
        Command::Keys {
            command,
            config,
            database_url,
        } => with_config(
            config.as_deref(),
            |config| set_database_url(config, database_url),
            |config| {
                runtime().block_on(async move {
                    match command {
                        KeysCommand::Create(args) => keys::create(config, args).await,
                        KeysCommand::List { json } => keys::list(config, json).await,
                        KeysCommand::Revoke { id } => keys::revoke(config, id).await,
                    }
                })
            },
        ),
        Command::Eval {
            constitution,
            config,
            file,
        } => with_config(
            config.as_deref(),
            |_| Ok(()),
            |config| runtime().block_on(eval::eval(config, constitution, file)),
        ),
        Command::Bench {
            files,
            constitution,
            out,
            config,
        } => with_config(
            config.as_deref(),
            |_| Ok(()),
            |config| {
                let run = |data, engine| bench::bench(engine, data, constitution, out);
                runtime().block_on(with_labelled(config, files, run))
            },
        ),
        Command::Calibrate {
            constitution,
            files,
            max_ordinary_fpr,
            ordinary_weight,
            oof_items,
            threshold_offset,
            target,
            scorer,
            scary_weight,
            config,
        } => with_config(
            config.as_deref(),
            |_| Ok(()),
            |config| {
                let options = charter::quality::CalibrateOptions {
                    target,
                    heads: scorer == "head",
                    scary_weights: scary_weight,
                    ordinary_weight,
                    max_ordinary_fpr,
                    oof_items,
                    threshold_offset,
                };
                let run = |data, engine| calibrate::calibrate(engine, data, constitution, options);
                runtime().block_on(with_labelled(config, files, run))
            },
        ),
    }
}

/// The prelude of every command that runs with a configuration: load it (exit 2 on a bad
/// one), apply the command's flags, start logging, then run.
fn with_config(
    file: Option<&Path>,
    adjust: impl FnOnce(&mut Config) -> Result<(), ExitCode>,
    run: impl FnOnce(Config) -> ExitCode,
) -> ExitCode {
    let mut config = match load_config(file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = adjust(&mut config) {
        return code;
    }
    init_tracing(&config);
    run(config)
}

/// The data of `bench` and `calibrate`.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Labelled data, e.g. ../shared/bench/dev.jsonl; repeatable: the first file gives the
    /// headline figures, each further one its own.
    #[arg(long, value_name = "FILE", required = true)]
    data: Vec<PathBuf>,
    /// Ordinary traffic (the same JSONL, every item ok); repeatable. Its false-alarm rate
    /// is reported per language, kind and source; calibrate fits on it as negatives.
    #[arg(long, value_name = "FILE")]
    ordinary: Vec<PathBuf>,
    /// Items of each ordinary source the heads are fitted on, at most (a stable sample of
    /// whole groups); the rest are only scored. 0: score ordinary traffic, never fit on it.
    #[arg(long, value_name = "N", default_value_t = charter::quality::ORDINARY_FIT_PER_SOURCE)]
    ordinary_fit: usize,
}

/// A rate in [0, 1).
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a rate from 0 to below 1")),
    }
}

/// A positive, finite weight.
fn parse_weight(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

/// The prelude of `bench` and `calibrate`: read the labelled data (exit 2 when it cannot
/// be read), load the engine (exit 1 when it fails), then run; errors are printed.
async fn with_labelled<F, Fut>(config: Config, files: DataArgs, run: F) -> ExitCode
where
    F: FnOnce(Data, Arc<Engine>) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let data = match Data::read_all(&files.data, &files.ordinary, files.ordinary_fit) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("charter: {e}");
            return ExitCode::from(2);
        }
    };
    match Engine::load(&config).await {
        Ok(engine) => run(data, Arc::new(engine)).await,
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(config.log.directives())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn load_config(file: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(file).map_err(|e| {
        eprintln!("charter: {e}");
        ExitCode::from(2)
    })
}

/// Applies `--database-url` and re-validates (the URL scheme).
fn set_database_url(config: &mut Config, url: Option<String>) -> Result<(), ExitCode> {
    if let Some(url) = url {
        config.database.url = charter::config::Secret::new(url);
        config.validate().map_err(|e| {
            eprintln!("charter: {e}");
            ExitCode::from(2)
        })?;
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
