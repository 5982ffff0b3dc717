//! `charter calibrate`: fit a constitution's heads and thresholds on labelled data.

use std::process::ExitCode;

use std::sync::Arc;

use charter::engine::Engine;
use charter::quality::Data;

pub async fn calibrate(
    engine: Arc<Engine>,
    data: Data,
    constitution: Option<String>,
    options: charter::quality::CalibrateOptions,
) -> ExitCode {
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
            if let Some(o) = c.files.first().and_then(|(_, cal)| cal.threshold_offset) {
                println!(
                    "threshold offset {o:+.4} included (measured where the encoder never saw the \
                     text); the out-of-fold figures below saw it, so they are in-sample"
                );
            }
            if let Some(t) = c.ensemble_threshold {
                println!("ensemble: threshold {t:.4} on the two models' mean margin");
            }
            println!(
                "out-of-fold recall {:.3}, FPR {:.3}, safe-but-scary FPR {:.3}",
                c.recall, c.fpr, c.scary_fpr
            );
            for (slice, fpr, n) in &c.ordinary_fpr {
                println!("ordinary traffic {slice:<40} {n:>6} items: false alarms {fpr:.4}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
}
