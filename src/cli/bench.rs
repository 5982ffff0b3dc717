//! `charter bench`: verdict quality on labelled data, with grouped cross-validation.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use charter::engine::Engine;
use charter::quality::Data;

pub async fn bench(
    engine: Arc<Engine>,
    data: Data,
    constitution: Option<String>,
    out: PathBuf,
) -> ExitCode {
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
