//! What this binary is: version, commit, compiler and target (set by `build.rs`).

use serde::Serialize;

/// Build facts, as `siteflow version` and the `siteflow_build_info` metric show them.
#[derive(Debug, Clone, Serialize)]
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub rustc: &'static str,
    pub target: &'static str,
    pub profile: &'static str,
}

/// This binary's build facts.
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("BUILD_INFO_COMMIT"),
    rustc: env!("BUILD_INFO_RUSTC"),
    target: env!("BUILD_INFO_TARGET"),
    profile: env!("BUILD_INFO_PROFILE"),
};

impl std::fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "siteflow {} (commit {}, {} build, {}, {})", self.version, self.commit, self.profile, self.target, self.rustc)
    }
}
