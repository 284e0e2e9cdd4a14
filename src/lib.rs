//! guestd: the guest agent of a sandbox VM.
//!
//! The library holds everything; `main.rs` only parses flags and calls [`app::run`].
//! See `docs/ARCHITECTURE.md` for the module map and data flow.

pub mod api;
pub mod app;
pub mod code_interpreter;
pub mod config;
pub mod env;
pub mod filesystem;
pub mod init;
pub mod kernel;
pub mod metrics;
pub mod paths;
pub mod portfwd;
pub mod process;
pub mod proto;
pub mod server;
pub mod sys;
pub mod transport;
