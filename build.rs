//! Compiles `proto/*.proto` without a `protoc` binary: `protox` parses the files into a
//! descriptor set; `prost-build` generates the message types; `pbjson-build` generates
//! canonical proto3 JSON (serde) for them; `tonic-prost-build` generates a gRPC *client*
//! used only by the integration tests (the server side is guestd's own transport).

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    source_commit();
    let protos = ["proto/process.proto", "proto/filesystem.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(protos, ["proto"])?;
    let fds_bytes = fds.encode_to_vec();
    std::fs::write(out.join("descriptors.bin"), &fds_bytes)?;

    let mut config = prost_build::Config::new();
    config
        .bytes(["."])
        .compile_well_known_types()
        // Timestamps get our own type: pbjson's writes `+00:00`, the contract (§1.4) and
        // protobuf-es (the JS SDK) need `Z`.
        .extern_path(".google.protobuf.Timestamp", "crate::proto::Timestamp")
        .extern_path(".google.protobuf", "::pbjson_types")
        .out_dir(&out);
    config.compile_fds(fds.clone())?;

    pbjson_build::Builder::new()
        .register_descriptors(&fds_bytes)?
        .ignore_unknown_fields()
        .out_dir(&out)
        .build(&[".process", ".filesystem"])?;

    // gRPC client stubs for the interop tests, in their own directory so they do not
    // overwrite the message files above.
    let client_out = out.join("grpc_client");
    std::fs::create_dir_all(&client_out)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .bytes(".")
        .out_dir(&client_out)
        .compile_fds(fds)?;
    Ok(())
}

/// `GUESTD_COMMIT` for `guestd -commit`: the variable when the build sets it (a build
/// outside a git checkout), else `git rev-parse HEAD`, else `unknown`. Rebuilds when
/// the checkout's HEAD moves.
#[allow(clippy::disallowed_methods)] // the build script, not the agent: no reaper here
fn source_commit() {
    println!("cargo:rerun-if-env-changed=GUESTD_COMMIT");
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    let commit = match std::env::var("GUESTD_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
    };
    // HEAD itself, the branch it points at, and packed refs (where a ref may live).
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
        watched.push(git(&["rev-parse", "--git-common-dir"]).map(|d| format!("{d}/packed-refs")));
    }
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=GUESTD_COMMIT={commit}");
}
