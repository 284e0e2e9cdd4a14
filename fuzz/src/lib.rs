//! Fuzz harnesses for guestd's hand-written parsers.
//!
//! Each module is one libFuzzer target (`fuzz_targets/<name>.rs` calls `<name>::run`)
//! taking raw bytes, so a committed input replays through the same function that
//! found it. Structured targets decode their input with `arbitrary` first. Every
//! target checks properties (round trips, chunking-independence, bounds), not only
//! the absence of panics. See `docs/FUZZING.md`.

pub mod content_headers;
pub mod envelope;
pub mod headers_misc;
pub mod http;
pub mod init_body;
pub mod interpreter_http;
pub mod jupyter_wire;
pub mod kernel_spec;
pub mod multipart;
pub mod ndjson_escape;
pub mod paths;
pub mod proc_text;
pub mod rpc_call;
pub mod rpc_decode;
pub mod sign;
pub mod start_plan;
pub mod upload_body;

/// A per-process scratch directory under `$GUESTD_FUZZ_SCRATCH` (`run.sh` points it
/// into `/dev/shm` and removes it afterwards: targets that write files run much faster
/// in memory), else the system temp dir.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let base = std::env::var_os("GUESTD_FUZZ_SCRATCH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("guestd-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}
