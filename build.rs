//! Build information for `siteflow version` and the `siteflow_build_info` metric: the commit
//! (`GIT_COMMIT` if set, as in container builds without `.git`; else `git rev-parse`), the rustc
//! version and the target.

use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = output(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_INFO_COMMIT={commit}");
    println!("cargo:rustc-env=BUILD_INFO_RUSTC={rustc_version}");
    println!("cargo:rustc-env=BUILD_INFO_TARGET={}", std::env::var("TARGET").unwrap_or_default());
    println!("cargo:rustc-env=BUILD_INFO_PROFILE={}", std::env::var("PROFILE").unwrap_or_default());
}
