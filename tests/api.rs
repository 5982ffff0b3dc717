//! The one integration test binary: the real server, the real model and the real default
//! constitution (and, in later modules, real databases and clients).

#[path = "common/mod.rs"]
mod common;

#[path = "api/cli.rs"]
mod cli;
#[path = "api/evaluate.rs"]
mod evaluate;
