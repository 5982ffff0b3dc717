//! `charter eval`: evaluate texts from a file or stdin, one JSON line per input, in input
//! order.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;

use charter::config::Config;
use charter::engine::Engine;

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
    /// What the rules' detectors found, as `/v1/evaluate` answers it.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    detections: &'a [charter::evaluate::Detection],
    #[serde(skip_serializing_if = "Option::is_none")]
    redacted: Option<&'a str>,
}

pub async fn eval(config: Config, constitution: Option<String>, file: Option<PathBuf>) -> ExitCode {
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
            detections: &r.detections,
            redacted: r.redacted.as_deref(),
        })
        .map_err(std::io::Error::other)?,
        (Ok(_), None) => return Ok(()),
    };
    writeln!(out, "{line}")
}
