//! Compiles hearth/v1/*.proto (and kubelet's PodResources, CRI's image and containerd's APIs) with protox (pure Rust), so a bare machine needs no `protoc`.
//! Also writes the encoded descriptor set that the controller serves through reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "hearth/v1/node.proto",
        "hearth/v1/agent.proto",
        "hearth/v1/operator.proto",
        "hearth/v1/placement.proto",
        "hearth/v1/scaling.proto",
        "keda/externalscaler.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(files)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hearth_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // `NodeAgent.Connect` would clash with the generated `connect(dst)` constructor;
        // callers build their own `Channel` (TLS, limits) and use `new`.
        .build_transport(false)
        .compile_fds(compiler.file_descriptor_set())?;

    // kubelet's PodResources API, for GPU-to-pod attribution; kept out of the descriptor set
    // above so the controller's reflection lists only Hearth's services.
    let kubelet = "k8s/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed={kubelet}");
    let mut k = protox::Compiler::new(["."])?;
    k.open_files([kubelet])?;
    tonic_prost_build::configure().emit_rerun_if_changed(false).compile_fds(k.file_descriptor_set())?;

    // The node's container runtime, for image prefetch: CRI's image service and the parts of
    // containerd's own API that CRI does not cover (content writes, leases, image labels).
    // Clients only: Hearth never serves these (tests use the real containerd). Generated here
    // from the public protos' messages (same names and numbers) rather than taken from the
    // `k8s-cri` and `containerd-client` crates: both match our tonic, but their build scripts
    // need `protoc`, which a bare machine lacks, and containerd-client compiles every
    // containerd service where Hearth calls five.
    let runtime = [
        "cri/runtime/v1/api.proto",
        "containerd/services/content/v1/content.proto",
        "containerd/services/images/v1/images.proto",
        "containerd/services/leases/v1/leases.proto",
        "containerd/services/version/v1/version.proto",
        "containerd/types/descriptor.proto",
    ];
    for f in &runtime {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut r = protox::Compiler::new(["."])?;
    r.include_imports(true);
    r.open_files(runtime)?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .build_server(false)
        // Blob data is handed on without a copy.
        .bytes(".containerd.services.content.v1.WriteContentRequest.data")
        .compile_fds(r.file_descriptor_set())?;
    Ok(())
}
