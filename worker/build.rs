//! tch binaries get no rpath: point every binary and test of this package at the libtorch it was built
//! against, and force-link libtorch so CUDA kernels are not dropped by --as-needed on GPU machines.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
