//! Builds the XDP program (lb-ebpf) for bpfel-unknown-none with aya-build; main.rs embeds
//! the object. Needs the nightly toolchain's rust-src and bpf-linker: `cargo xtask setup`.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata_root()?;
    let root_dir = format!("{metadata}/lb-ebpf");
    // aya-build watches lb-ebpf; the program also compiles lb-common's types into itself.
    println!("cargo:rerun-if-changed={metadata}/lb-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &root_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the XDP program (lb-ebpf) failed; run `cargo xtask setup` first: it installs rust-src for nightly and bpf-linker")
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let parent = std::path::Path::new(&manifest).parent().ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR has no parent"))?;
    Ok(parent.display().to_string())
}
