//! Builds the XDP objects with aya-build: lb-ebpf (always; one `cargo build --bins` makes
//! its bins, `lb-xdp`, the load balancer, `lb-decap`, the targets' decap program, and
//! `lb-xdp-next`, the upgrade tests' second build) and, with the `tools` feature, lb-tools-ebpf (generator, sink, pass). aya-build
//! copies each bin into OUT_DIR under its bin name; the library embeds them (`lb-xdp-next`
//! with the `tools` feature only).
//! Needs the nightly toolchain's rust-src and bpf-linker: `cargo xtask setup`.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    let lb = format!("{root}/lb-ebpf");
    let tools = format!("{root}/lb-tools-ebpf");
    // aya-build watches the program crates; they also compile lb-common's types in.
    println!("cargo:rerun-if-changed={root}/lb-common");
    let package = |name, root_dir| aya_build::Package { name, root_dir, no_default_features: false, features: &[] };
    let mut packages = vec![package("lb-ebpf", lb.as_str())];
    if std::env::var_os("CARGO_FEATURE_TOOLS").is_some() {
        packages.push(package("lb-tools-ebpf", tools.as_str()));
    }
    aya_build::build_ebpf(packages, aya_build::Toolchain::Nightly).context(
        "building the XDP programs (lb-ebpf, lb-tools-ebpf) failed; run `cargo xtask setup` first: it installs rust-src for nightly and bpf-linker",
    )
}

fn workspace_root() -> anyhow::Result<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let parent = std::path::Path::new(&manifest).parent().ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR has no parent"))?;
    Ok(parent.display().to_string())
}
