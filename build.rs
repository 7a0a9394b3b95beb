//! Compiles Dapr's gRPC API (the `.proto` files under `proto/`, written for Outrigger from
//! Dapr's wire format) into Rust, with the bridge feature only. protox parses them in pure
//! Rust, so a fresh clone builds with cargo alone: no `protoc` on the machine.

fn main() {
    if std::env::var_os("CARGO_FEATURE_BRIDGE").is_none() {
        return;
    }
    if let Err(e) = compile() {
        eprintln!("error: cannot compile the Dapr .proto files: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "bridge")]
fn compile() -> Result<(), Box<dyn std::error::Error>> {
    const FILES: &[&str] = &[
        "proto/dapr/proto/common/v1/common.proto",
        "proto/dapr/proto/runtime/v1/dapr.proto",
        "proto/dapr/proto/runtime/v1/appcallback.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(FILES, ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}

#[cfg(not(feature = "bridge"))]
fn compile() -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}
