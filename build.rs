//! Compiles cuDNN's attention (`src/model/cudnn/sdpa.cpp`) when the `cudnn` feature is on;
//! nothing otherwise. Headers only: the C++ loads libcudnn at run time (the cuDNN frontend's
//! dynamic loading), so nothing is linked beyond the C++ runtime and libdl.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cudnn")]
    cudnn::build();
}

#[cfg(feature = "cudnn")]
mod cudnn {
    use std::env;
    use std::path::PathBuf;

    const SOURCE: &str = "src/model/cudnn/sdpa.cpp";

    /// `var`'s directory, else `default` under the setup scripts' root, if it holds `probe`.
    fn include(var: &str, default: &str, probe: &str) -> PathBuf {
        println!("cargo:rerun-if-env-changed={var}");
        let dir = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            let root = env::var_os("ESMBED_CUDA_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env::var("HOME").unwrap_or_default()).join(".cache/esmbed-cuda")
                });
            root.join(default)
        });
        if !dir.join(probe).is_file() {
            panic!(
                "the `cudnn` feature needs {probe} in {} (set {var}, or run `bash scripts/setup-cudnn.sh`)",
                dir.display()
            );
        }
        dir
    }

    pub fn build() {
        println!("cargo:rerun-if-changed={SOURCE}");
        println!("cargo:rerun-if-env-changed=ESMBED_CUDA_ROOT");
        let frontend = include(
            "CUDNN_FRONTEND_INCLUDE_DIR",
            "cudnn/frontend/include",
            "cudnn_frontend.h",
        );
        let cudnn = include("CUDNN_INCLUDE_DIR", "cudnn/include", "cudnn.h");
        let cuda = include(
            "CUDA_INCLUDE_DIR",
            &env::var("CUDA_HOME").map_or("site/nvidia/cu13/include".into(), |h| {
                format!("{h}/include")
            }),
            "cuda.h",
        );
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .file(SOURCE)
            .include(frontend)
            .include(cudnn)
            .include(cuda)
            .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
            // The frontend's headers warn about their own unused parameters.
            .warnings(false)
            .opt_level(2)
            .compile("esmbed_cudnn");
        println!("cargo:rustc-link-lib=dylib=dl");
    }
}
