//! `charter migrate`: apply the audit database's migrations and exit.

use std::process::ExitCode;

use charter::config::Config;

pub async fn migrate(config: Config) -> ExitCode {
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
