//! The `charter` command line: parse arguments and configuration, start tracing, hand
//! over to the library. Subcommands are documented in README.md and by `--help`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde::Serialize;

use charter::config::{Config, LogFormat};
use charter::constitution;
use charter::engine::Engine;

#[derive(Parser)]
#[command(
    name = "charter",
    version,
    about = "Constitutional-rules evaluation service"
)]
struct Cli {
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
        /// Labelled data, e.g. ../shared/bench/dev.jsonl; repeatable: the first file gives
        /// the headline figures, each further one its own.
        #[arg(long, value_name = "FILE", required = true)]
        data: Vec<PathBuf>,
        /// Ordinary traffic (JSONL of the same format, every item ok); repeatable. Its
        /// false-alarm rate is reported per language, kind and source.
        #[arg(long, value_name = "FILE")]
        ordinary: Vec<PathBuf>,
        /// Items of each ordinary source the heads are fitted on, at most (as calibrate's).
        #[arg(long, value_name = "N", default_value_t = charter::quality::ORDINARY_FIT_PER_SOURCE)]
        ordinary_fit: usize,
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
        /// Labelled data (the `bench` format); repeatable.
        #[arg(long, value_name = "FILE", required = true)]
        data: Vec<PathBuf>,
        /// Ordinary traffic (every item ok), negatives of the heads' fit; repeatable.
        #[arg(long, value_name = "FILE")]
        ordinary: Vec<PathBuf>,
        /// Items of each ordinary source the heads are fitted on, at most (a stable sample
        /// of whole groups); the rest are only scored.
        #[arg(long, value_name = "N", default_value_t = charter::quality::ORDINARY_FIT_PER_SOURCE)]
        ordinary_fit: usize,
        /// With --ordinary: raise the threshold until at most this share of the ordinary
        /// items fail out of fold (the recall it leaves is printed).
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_ordinary_fpr: Option<f64>,
        /// Sample weight of ordinary items in the heads' fit.
        #[arg(long, value_name = "W", default_value_t = 1.0, value_parser = parse_weight)]
        ordinary_weight: f64,
        /// Also write every item's out-of-fold margins here (the `items.jsonl` format of
        /// bench; thresholds are the fitted ones, so rates read off it are in-sample).
        #[arg(long, value_name = "FILE")]
        oof_items: Option<PathBuf>,
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

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Healthcheck { addr, config } => {
            let addr = match addr {
                Some(addr) => addr,
                None => match load_config(config.as_deref()) {
                    Ok(c) => probe_addr(c.server.bind),
                    Err(code) => return code,
                },
            };
            healthcheck(addr)
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
            |config| runtime().block_on(serve(config)),
        ),
        Command::Migrate {
            config,
            database_url,
        } => with_config(
            config.as_deref(),
            |config| set_database_url(config, database_url),
            |config| runtime().block_on(migrate(config)),
        ),
        Command::Eval {
            constitution,
            config,
            file,
        } => with_config(
            config.as_deref(),
            |_| Ok(()),
            |config| runtime().block_on(eval(config, constitution, file)),
        ),
        Command::Bench {
            data,
            ordinary,
            ordinary_fit,
            constitution,
            out,
            config,
        } => with_config(
            config.as_deref(),
            |_| Ok(()),
            |config| {
                let files = (data, ordinary, ordinary_fit);
                runtime().block_on(bench(config, files, constitution, out))
            },
        ),
        Command::Calibrate {
            constitution,
            data,
            ordinary,
            ordinary_fit,
            max_ordinary_fpr,
            ordinary_weight,
            oof_items,
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
                };
                let files = (data, ordinary, ordinary_fit);
                runtime().block_on(calibrate(config, files, constitution, options))
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

/// Labelled files, then ordinary-traffic files and how many items of each of its sources
/// are fitted on.
type DataFiles = (Vec<PathBuf>, Vec<PathBuf>, usize);

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

/// Reads labelled data and loads the engine; errors are printed.
async fn load_labelled(
    config: &Config,
    (labelled, ordinary, fit): &DataFiles,
) -> Result<(charter::quality::Data, Arc<Engine>), ExitCode> {
    let data = charter::quality::Data::read_all(labelled, ordinary, *fit).map_err(|e| {
        eprintln!("charter: {e}");
        ExitCode::from(2)
    })?;
    let engine = Engine::load(config).await.map_err(|e| {
        eprintln!("charter: {e}");
        ExitCode::FAILURE
    })?;
    Ok((data, Arc::new(engine)))
}

async fn bench(
    config: Config,
    data: DataFiles,
    constitution: Option<String>,
    out: PathBuf,
) -> ExitCode {
    let (data, engine) = match load_labelled(&config, &data).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match charter::quality::bench(&engine, constitution.as_deref(), &data, &out).await {
        Ok(b) => {
            println!("{}", b.report.summary());
            println!(
                "wrote {}, {} and {}",
                b.json.display(),
                b.png.display(),
                b.items.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn calibrate(
    config: Config,
    data: DataFiles,
    constitution: Option<String>,
    options: charter::quality::CalibrateOptions,
) -> ExitCode {
    let (data, engine) = match load_labelled(&config, &data).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match charter::quality::calibrate(&engine, constitution.as_deref(), &data, &options).await {
        Ok(c) => {
            for (path, cal) in &c.files {
                let t = cal.rules.values().next().map_or(0.0, |r| r.threshold);
                let heads = cal.rules.values().filter(|r| r.head.is_some()).count();
                println!(
                    "{}: model {}, target {} on {} items: {heads} heads, shared threshold {t:.4}{}",
                    path.display(),
                    cal.model,
                    cal.target,
                    data.items.len(),
                    cal.piece_margin
                        .map_or(String::new(), |m| format!(", sentence margin {m:.3}")),
                );
            }
            if let Some(t) = c.ensemble_threshold {
                println!("ensemble: threshold {t:.4} on the two models' mean margin");
            }
            println!(
                "out-of-fold recall {:.3}, FPR {:.3}, safe-but-scary FPR {:.3}",
                c.recall, c.fpr, c.scary_fpr
            );
            for (lang, fpr, n) in &c.ordinary_fpr {
                println!("ordinary traffic {lang:<40} {n:>6} items: false alarms {fpr:.4}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
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

async fn migrate(config: Config) -> ExitCode {
    match charter::store::migrate(&config.database).await {
        Ok((dialect, versions)) => {
            println!(
                "{dialect}: migrations applied (versions known to this release: {versions:?})"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.server.bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(bind = %config.server.bind, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match charter::run(config, listener, charter::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "charter stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match constitution::parse_file(file) {
            Ok(c) => {
                let examples: usize = c
                    .rules
                    .iter()
                    .map(|r| r.violating.len() + r.compliant.len())
                    .sum::<usize>()
                    + c.shared_compliant.len();
                println!(
                    "{}: ok: constitution {:?} version {} with {} rules and {} exemplars{}",
                    file.display(),
                    c.id,
                    c.version,
                    c.rules.len(),
                    examples,
                    if c.calibrations.is_empty() {
                        String::new()
                    } else {
                        let models: Vec<&str> =
                            c.calibrations.iter().map(|c| c.model.as_str()).collect();
                        format!(" (calibrated for {})", models.join(", "))
                    }
                );
                let mut models: Vec<&str> =
                    c.calibrations.iter().map(|c| c.model.as_str()).collect();
                if models.is_empty() {
                    models.push("any model");
                }
                for model in models {
                    let silent = c.silent_rules(model);
                    if !silent.is_empty() {
                        println!(
                            "{}: warning: with {model}, these rules can never be violated: {}",
                            file.display(),
                            silent.join(", ")
                        );
                    }
                }
            }
            Err(errors) => {
                ok = false;
                for e in errors.0 {
                    eprintln!("{e}");
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Where a probe on the same host reaches a server bound to `bind`: a server listening on
/// every address (0.0.0.0 or ::, as in a container) answers on loopback.
fn probe_addr(bind: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, bind.port())
}

fn healthcheck(addr: std::net::SocketAddr) -> ExitCode {
    use std::io::Read;
    let attempt = || -> std::io::Result<bool> {
        let timeout = std::time::Duration::from_secs(3);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
    };
    match attempt() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("charter at {addr} is not ready");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("charter at {addr} is unreachable: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One input line of `charter eval`.
struct Input {
    id: serde_json::Value,
    text: Result<String, String>,
}

fn parse_line(n: usize, line: &str) -> Input {
    let trimmed = line.trim_end_matches(['\r', '\n']);
    if trimmed.trim_start().starts_with('{') {
        if let Ok(serde_json::Value::Object(obj)) =
            serde_json::from_str::<serde_json::Value>(trimmed)
        {
            let id = obj.get("id").cloned().unwrap_or(serde_json::Value::from(n));
            let text = match obj.get("text") {
                Some(serde_json::Value::String(t)) if !t.trim().is_empty() => Ok(t.clone()),
                Some(serde_json::Value::String(_)) => Err("empty text".to_string()),
                Some(_) => Err("\"text\" is not a string".to_string()),
                None => Err("missing \"text\"".to_string()),
            };
            return Input { id, text };
        }
    }
    Input {
        id: serde_json::Value::from(n),
        text: if trimmed.trim().is_empty() {
            Err("empty text".to_string())
        } else {
            Ok(trimmed.to_string())
        },
    }
}

#[derive(Serialize)]
struct EvalRule<'a> {
    id: &'a str,
    score: f32,
    threshold: f32,
    violated: bool,
}

#[derive(Serialize)]
struct EvalLine<'a> {
    id: &'a serde_json::Value,
    verdict: charter::evaluate::Verdict,
    risk: f32,
    violated: Vec<&'a str>,
    rules: Vec<EvalRule<'a>>,
}

async fn eval(config: Config, constitution: Option<String>, file: Option<PathBuf>) -> ExitCode {
    let reader: Box<dyn BufRead> = match &file {
        Some(path) if path.as_os_str() != "-" => match std::fs::File::open(path) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("charter: cannot open {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        _ => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut inputs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        match line {
            Ok(l) if l.trim().is_empty() => continue,
            Ok(l) => inputs.push(parse_line(n + 1, &l)),
            Err(e) => {
                eprintln!("charter: read error at line {}: {e}", n + 1);
                return ExitCode::from(2);
            }
        }
    }
    let engine = match Engine::load(&config).await {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("charter: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = engine.constitution(constitution.as_deref()) {
        eprintln!("charter: {e}");
        return ExitCode::from(2);
    }
    let progress = indicatif::ProgressBar::new(inputs.len() as u64);
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let chunks: Vec<Vec<usize>> = (0..inputs.len())
        .filter(|&i| inputs[i].text.is_ok())
        .collect::<Vec<_>>()
        .chunks(16)
        .map(<[usize]>::to_vec)
        .collect();
    let mut results: Vec<Option<charter::evaluate::TextResult>> = vec![None; inputs.len()];
    let mut stream = futures_util::stream::iter(chunks.into_iter().map(|chunk| {
        let engine = Arc::clone(&engine);
        let texts: Vec<String> = chunk
            .iter()
            .map(|&i| inputs[i].text.clone().unwrap_or_default())
            .collect();
        let constitution = constitution.clone();
        async move {
            let out = engine
                .evaluate(Arc::new(texts), constitution.as_deref())
                .await;
            (chunk, out)
        }
    }))
    .buffered(4);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut next = 0usize;
    let mut failed = false;
    while let Some((chunk, outcome)) = stream.next().await {
        match outcome {
            Ok(evaluation) => {
                progress.inc(chunk.len() as u64);
                for (i, r) in chunk.into_iter().zip(evaluation.results) {
                    results[i] = Some(r);
                }
            }
            Err(e) => {
                eprintln!("charter: evaluation failed: {e}");
                failed = true;
                break;
            }
        }
        // Write every line whose result (or input error) is known, in input order.
        while next < inputs.len() && (inputs[next].text.is_err() || results[next].is_some()) {
            if write_line(&mut out, &inputs[next], results[next].take()).is_err() {
                return ExitCode::FAILURE;
            }
            next += 1;
        }
    }
    while !failed && next < inputs.len() && inputs[next].text.is_err() {
        let _ = write_line(&mut out, &inputs[next], None);
        next += 1;
    }
    let _ = out.flush();
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "charter: evaluated {} texts in {:.1} s ({:.0} texts/s)",
        inputs.len(),
        secs,
        inputs.len() as f64 / secs.max(1e-9)
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn write_line(
    out: &mut impl Write,
    input: &Input,
    result: Option<charter::evaluate::TextResult>,
) -> std::io::Result<()> {
    let line = match (&input.text, &result) {
        (Err(e), _) => serde_json::json!({"id": input.id, "error": e}).to_string(),
        (Ok(_), Some(r)) => serde_json::to_string(&EvalLine {
            id: &input.id,
            verdict: r.verdict,
            risk: r.risk,
            violated: r.violated().map(|x| x.id.as_str()).collect(),
            rules: r
                .rules
                .iter()
                .map(|x| EvalRule {
                    id: &x.id,
                    score: x.score,
                    threshold: x.threshold,
                    violated: x.violated,
                })
                .collect(),
        })
        .map_err(std::io::Error::other)?,
        (Ok(_), None) => return Ok(()),
    };
    writeln!(out, "{line}")
}

#[cfg(test)]
mod tests {
    use super::probe_addr;

    #[test]
    fn probes_loopback_when_bound_to_every_address() {
        let probe = |bind: &str| probe_addr(bind.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(probe("[::]:9090"), "[::1]:9090");
        assert_eq!(probe("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}
