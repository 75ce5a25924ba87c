//! Generates the hcmoco.v1 messages and services, plus a descriptor set for gRPC reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("hcmoco_v1_descriptor.bin"))
        .compile_protos(&["hcmoco/v1/hcmoco.proto"], &["."])?;
    println!("cargo:rerun-if-changed=hcmoco/v1/hcmoco.proto");
    Ok(())
}
