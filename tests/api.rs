//! The one integration test binary: the real server, the real model and the real default
//! constitution (and, in later modules, real databases and clients).

#[path = "common/mod.rs"]
mod common;

#[path = "api/abuse.rs"]
mod abuse;
#[path = "api/cli.rs"]
mod cli;
#[path = "api/container.rs"]
mod container;
#[path = "api/evaluate.rs"]
mod evaluate;
#[path = "api/keys.rs"]
mod keys;
#[path = "api/model.rs"]
mod model;

#[path = "common/anthropic_mock.rs"]
mod anthropic_mock;
#[path = "api/gateway.rs"]
mod gateway;
#[path = "api/gateway_limits.rs"]
mod gateway_limits;
#[path = "api/gateway_sdk.rs"]
mod gateway_sdk;
#[path = "api/gateway_stream.rs"]
mod gateway_stream;
#[path = "api/gateway_turns.rs"]
mod gateway_turns;
#[path = "api/redact.rs"]
mod redact;
#[path = "api/refusal.rs"]
mod refusal;
#[path = "api/store.rs"]
mod store;
