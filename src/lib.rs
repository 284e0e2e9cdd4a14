//! guestd: the guest agent of a sandbox VM.
//!
//! The library holds everything; `main.rs` only parses flags and calls into it.
//! See `docs/ARCHITECTURE.md` for the module map and data flow.

pub mod config;
pub mod env;
pub mod paths;
pub mod proto;
pub mod server;
pub mod sys;
pub mod transport;
