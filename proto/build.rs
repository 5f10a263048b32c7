//! Compiles the .proto files with protox (pure Rust, no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "somna/v1/process.proto",
        "somna/v1/files.proto",
        "somna/v1/sandbox.proto",
        "somna/v1/hosts.proto",
        "somna/v1/images.proto",
        "somna/v1/apps.proto",
        "somna/host/v1/host.proto",
        "somna/guest/v1/guest.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
