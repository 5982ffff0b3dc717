//! `charter serve`: bind, then run the service until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use charter::config::Config;

pub async fn serve(config: Config) -> ExitCode {
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
