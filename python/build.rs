//! The CUDA build of the extension finds CUDA 13's libraries (cuBLAS, cudart, NVRTC, cuRAND) in
//! the NVIDIA wheels pip installs beside it (`site-packages/nvidia/cu13/lib`), as PyTorch's
//! wheels do, so no CUDA toolkit is needed on the user's machine; the driver's `libcuda.so.1`
//! comes from the system.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib");
    }
}
