//! `charter keys create|list|revoke`: API keys in the audit database (`database.url`),
//! which every replica reads. `create` prints the key once, alone on stdout (so
//! `KEY=$(charter keys create ...)` works); only its sha256 is stored.

use std::process::ExitCode;

use charter::auth::key::{split_list, KeySpec};
use charter::auth::{KeyInfo, Scope};
use charter::config::Config;
use charter::store::keys::KeyStore;

/// What `charter keys create` is given.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// Who or what holds the key (shown in listings).
    #[arg(long)]
    name: String,
    /// Comma-separated: evaluate, gateway, audit:read, admin, metrics.
    #[arg(long, value_name = "SCOPES")]
    scopes: String,
    /// A constitution the key may use; repeatable. The first is the key's default. None:
    /// any constitution, the service's default.
    #[arg(long = "constitution", value_name = "ID")]
    constitutions: Vec<String>,
    /// The key's default constitution, when it is not the first --constitution (with no
    /// --constitution: any other may still be named per request).
    #[arg(long, value_name = "ID")]
    default_constitution: Option<String>,
    /// Requests per second (a token bucket per replica holding one second's worth).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Texts per second (/v1/evaluate counts each text of a batch; a gateway exchange
    /// counts one).
    #[arg(long, value_name = "T")]
    text_rate: Option<f64>,
}

async fn open(config: &Config) -> Result<KeyStore, ExitCode> {
    let store = KeyStore::new(&config.database);
    if config.database.migrate {
        if let Err(e) = store.migrate().await {
            eprintln!("charter: {e}");
            return Err(ExitCode::FAILURE);
        }
    }
    Ok(store)
}

pub async fn create(config: Config, args: CreateArgs) -> ExitCode {
    let scopes = match Scope::parse_list(&args.scopes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("charter: --scopes: {e}");
            return ExitCode::from(2);
        }
    };
    let spec = KeySpec {
        name: args.name,
        scopes,
        constitution: args.default_constitution,
        constitutions: args
            .constitutions
            .iter()
            .flat_map(|c| split_list(c))
            .map(str::to_string)
            .collect(),
        rate: args.rate,
        text_rate: args.text_rate,
    };
    let new = match spec.create(chrono::Utc::now().timestamp_millis()) {
        Ok(new) => new,
        Err(e) => {
            eprintln!("charter: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match open(&config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let inserted = store.insert(&new.row).await;
    store.close().await;
    if let Err(e) = inserted {
        eprintln!("charter: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "created {} ({}), scopes {}; the key below is shown this once: store it now",
        new.row.id, new.row.name, new.row.scopes
    );
    println!("{}", new.key);
    ExitCode::SUCCESS
}

pub async fn list(config: Config, json: bool) -> ExitCode {
    let store = match open(&config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rows = store.list().await;
    store.close().await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("charter: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keys: Vec<KeyInfo> = rows.iter().map(KeyInfo::from).collect();
    if json {
        for key in &keys {
            println!("{}", serde_json::to_string(key).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<21} {:<20} {:<34} {:<16} {:>8} {:>8}  state",
        "id", "name", "scopes", "constitutions", "req/s", "texts/s"
    );
    for k in &keys {
        let rate = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r}"));
        println!(
            "{:<21} {:<20} {:<34} {:<16} {:>8} {:>8}  {}",
            k.id,
            k.name,
            k.scopes.join(","),
            k.constitutions
                .as_ref()
                .map_or_else(|| "any".to_string(), |c| c.join(",")),
            rate(k.rate),
            rate(k.text_rate),
            k.revoked
                .as_ref()
                .map_or_else(|| "active".to_string(), |t| format!("revoked {t}")),
        );
    }
    ExitCode::SUCCESS
}

pub async fn revoke(config: Config, id: String) -> ExitCode {
    let store = match open(&config).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let revoked = store
        .revoke(&id, chrono::Utc::now().timestamp_millis())
        .await;
    store.close().await;
    match revoked {
        Ok(Some(row)) => {
            println!(
                "revoked {} ({}); replicas refuse it within auth.cache_secs = {} s",
                row.id, row.name, config.auth.cache_secs
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("charter: no API key with id {id:?} (`charter keys list` shows them)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("charter: {e}");
            ExitCode::FAILURE
        }
    }
}
