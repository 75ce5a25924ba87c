//! Where `libnccl.so.2` is looked for. Pure: the inputs (the process's memory map, `LIBTORCH`,
//! `HCMOCO_VENV`) are passed in, and only `is_file` touches the disk.
//!
//! The PyPI wheel `nvidia-nccl-cu13` ships the library as `site-packages/nvidia/nccl/lib/libnccl.so.2`,
//! a name cudarc's loader does not try (it tries `libnccl.so`, `libnccl.so.1`, `libnccl.so.<cuda major>`
//! ...), so the backend finds the file itself and loads it by its full path. Order, first found wins:
//! 1. a `libnccl.so*` already mapped into this process: PyPI torch's `libtorch_cuda.so` links it, so in a
//!    worker linked against CUDA libtorch this is the very library libtorch uses (one NCCL per process);
//! 2. `<site-packages>/nvidia/nccl/lib/`, for the site-packages above `$LIBTORCH`, above the directory of
//!    the libtorch mapped into this process, and under `$HCMOCO_VENV/lib/python3*/`;
//! 3. the system loader by bare name (`libnccl.so.2`, then `libnccl.so`): `LD_LIBRARY_PATH`, the
//!    binary's run path, `/etc/ld.so.cache`, `/lib`, `/usr/lib` (a system-wide NCCL install).

use std::path::{Path, PathBuf};

/// File names of the NCCL library, preferred first.
pub(super) const NCCL_FILE_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// What the search starts from.
#[derive(Debug, Clone, Default)]
pub(super) struct SearchInputs {
    /// The text of `/proc/self/maps` (empty where unavailable).
    pub maps: String,
    /// `$LIBTORCH`: the `torch` package directory (`.../site-packages/torch`) or a libtorch download.
    pub libtorch: Option<PathBuf>,
    /// `$HCMOCO_VENV`: the virtual environment holding PyPI torch.
    pub venv: Option<PathBuf>,
}

impl SearchInputs {
    /// The inputs of this process.
    pub(super) fn from_process() -> SearchInputs {
        SearchInputs {
            maps: std::fs::read_to_string("/proc/self/maps").unwrap_or_default(),
            libtorch: std::env::var_os("LIBTORCH").filter(|v| !v.is_empty()).map(PathBuf::from),
            venv: std::env::var_os("HCMOCO_VENV").filter(|v| !v.is_empty()).map(PathBuf::from),
        }
    }
}

/// One way of loading the library, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Candidate {
    /// An existing file, loaded by its full path.
    File { path: PathBuf, origin: &'static str },
    /// A bare name handed to the system loader.
    System { name: &'static str },
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Candidate::File { path, origin } => write!(f, "{} ({origin})", path.display()),
            Candidate::System { name } => write!(f, "{name} (system loader)"),
        }
    }
}

/// The outcome of a search: what to try, and the paths looked at that did not exist (for messages).
#[derive(Debug, Clone, Default)]
pub(super) struct Search {
    pub candidates: Vec<Candidate>,
    pub missing: Vec<PathBuf>,
}

/// Candidates for NCCL in the order of the module documentation.
pub(super) fn nccl_candidates(inputs: &SearchInputs) -> Search {
    let mut search = Search::default();
    let push_file = |search: &mut Search, path: PathBuf, origin: &'static str| {
        let known = search.candidates.iter().any(|c| matches!(c, Candidate::File { path: p, .. } if *p == path));
        if !known {
            search.candidates.push(Candidate::File { path, origin });
        }
    };
    if let Some(path) = mapped_library(&inputs.maps, "libnccl.so") {
        push_file(&mut search, path, "already loaded in this process");
    }
    for (site_packages, origin) in site_packages_dirs(inputs) {
        for name in NCCL_FILE_NAMES {
            let path = site_packages.join("nvidia/nccl/lib").join(name);
            if path.is_file() {
                push_file(&mut search, path, origin);
            } else if !search.missing.contains(&path) {
                search.missing.push(path);
            }
        }
    }
    search.candidates.extend(NCCL_FILE_NAMES.map(|name| Candidate::System { name }));
    search
}

/// Why NCCL could not be loaded: the files looked for, and each load that failed.
pub(super) fn not_found_message(search: &Search, failures: &[String]) -> String {
    let missing = search.missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    format!(
        "the NCCL library (libnccl.so.2, from the nvidia-nccl-cu13 wheel) was not found: no such file at [{}]; \
         loading failed for [{}]; install torch's CUDA wheels in $HCMOCO_VENV or point $LIBTORCH at a PyPI torch",
        missing.join(", "),
        failures.join("; ")
    )
}

/// The site-packages directories to look in, with where each came from, without duplicates.
pub(super) fn site_packages_dirs(inputs: &SearchInputs) -> Vec<(PathBuf, &'static str)> {
    let mut dirs: Vec<(PathBuf, &'static str)> = Vec::new();
    let mut push = |dir: PathBuf, origin: &'static str| {
        if !dirs.iter().any(|(d, _)| *d == dir) {
            dirs.push((dir, origin));
        }
    };
    // `$LIBTORCH` is `.../site-packages/torch` for a PyPI torch.
    if let Some(parent) = inputs.libtorch.as_deref().and_then(Path::parent) {
        push(parent.to_path_buf(), "site-packages above $LIBTORCH");
    }
    // The mapped libtorch lives in `.../site-packages/torch/lib/`.
    if let Some(site_packages) =
        mapped_torch_lib_dir(&inputs.maps).as_deref().and_then(Path::parent).and_then(Path::parent)
    {
        push(site_packages.to_path_buf(), "site-packages of the loaded libtorch");
    }
    if let Some(venv) = &inputs.venv {
        for dir in venv_site_packages(venv) {
            push(dir, "site-packages of $HCMOCO_VENV");
        }
    }
    dirs
}

/// `<venv>/lib/python3*/site-packages`, sorted (normally exactly one).
fn venv_site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The file paths mapped into the process, in the order of `/proc/self/maps`.
fn mapped_paths(maps: &str) -> impl Iterator<Item = &Path> {
    // Fields: address perms offset dev inode pathname; the path (which may hold spaces) is the rest.
    maps.lines().filter_map(|line| {
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace)?;
            rest = &rest[end..];
        }
        let path = rest.trim();
        path.starts_with('/').then(|| Path::new(path))
    })
}

/// The first mapped file whose name starts with `prefix` (e.g. `libnccl.so`).
pub(super) fn mapped_library(maps: &str, prefix: &str) -> Option<PathBuf> {
    mapped_paths(maps)
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .map(Path::to_path_buf)
}

/// The directory of the libtorch mapped into the process (`.../torch/lib`).
fn mapped_torch_lib_dir(maps: &str) -> Option<PathBuf> {
    const LIBTORCH_FILES: [&str; 3] = ["libtorch_cpu.so", "libtorch.so", "libc10.so"];
    mapped_paths(maps)
        .find(|p| p.file_name().is_some_and(|n| LIBTORCH_FILES.iter().any(|f| n == *f)))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A venv with PyPI torch and the NCCL wheel, as pip lays it out.
    fn fake_venv(root: &Path, with_nccl: bool) -> (PathBuf, PathBuf) {
        let venv = root.join("venv");
        let site_packages = venv.join("lib/python3.12/site-packages");
        std::fs::create_dir_all(site_packages.join("torch/lib")).expect("mkdir torch/lib");
        std::fs::write(site_packages.join("torch/lib/libtorch_cpu.so"), b"").expect("write libtorch_cpu.so");
        if with_nccl {
            std::fs::create_dir_all(site_packages.join("nvidia/nccl/lib")).expect("mkdir nvidia/nccl/lib");
            std::fs::write(site_packages.join("nvidia/nccl/lib/libnccl.so.2"), b"").expect("write libnccl.so.2");
        }
        (venv, site_packages)
    }

    fn maps_line(path: &Path) -> String {
        format!("7f0c2a000000-7f0c2a200000 r-xp 00000000 08:01 1234567                    {}\n", path.display())
    }

    fn files(search: &Search) -> Vec<(PathBuf, &'static str)> {
        search
            .candidates
            .iter()
            .filter_map(|c| match c {
                Candidate::File { path, origin } => Some((path.clone(), *origin)),
                Candidate::System { .. } => None,
            })
            .collect()
    }

    #[test]
    fn finds_the_wheel_library_through_the_venv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (venv, site_packages) = fake_venv(dir.path(), true);
        let search = nccl_candidates(&SearchInputs { venv: Some(venv), ..Default::default() });
        assert_eq!(
            files(&search),
            vec![(site_packages.join("nvidia/nccl/lib/libnccl.so.2"), "site-packages of $HCMOCO_VENV")]
        );
        // The system loader is the last resort, after the file.
        assert_eq!(search.candidates.last(), Some(&Candidate::System { name: "libnccl.so" }));
    }

    #[test]
    fn finds_the_wheel_library_through_libtorch_and_through_the_loaded_libtorch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, site_packages) = fake_venv(dir.path(), true);
        let expected = site_packages.join("nvidia/nccl/lib/libnccl.so.2");

        let by_env =
            nccl_candidates(&SearchInputs { libtorch: Some(site_packages.join("torch")), ..Default::default() });
        assert_eq!(files(&by_env), vec![(expected.clone(), "site-packages above $LIBTORCH")]);

        let maps = maps_line(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"))
            + &maps_line(&site_packages.join("torch/lib/libtorch_cpu.so"));
        let by_maps = nccl_candidates(&SearchInputs { maps, ..Default::default() });
        assert_eq!(files(&by_maps), vec![(expected, "site-packages of the loaded libtorch")]);
    }

    #[test]
    fn an_already_loaded_nccl_comes_first_and_duplicates_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (venv, site_packages) = fake_venv(dir.path(), true);
        let wheel = site_packages.join("nvidia/nccl/lib/libnccl.so.2");
        let maps = maps_line(&site_packages.join("torch/lib/libtorch_cpu.so")) + &maps_line(&wheel);
        let search =
            nccl_candidates(&SearchInputs { maps, libtorch: Some(site_packages.join("torch")), venv: Some(venv) });
        assert_eq!(files(&search), vec![(wheel, "already loaded in this process")]);
    }

    #[test]
    fn without_the_wheel_only_the_system_loader_remains_and_the_misses_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (venv, site_packages) = fake_venv(dir.path(), false);
        let search = nccl_candidates(&SearchInputs { venv: Some(venv), ..Default::default() });
        assert!(files(&search).is_empty());
        assert_eq!(
            search.candidates,
            vec![Candidate::System { name: "libnccl.so.2" }, Candidate::System { name: "libnccl.so" }]
        );
        assert!(search.missing.contains(&site_packages.join("nvidia/nccl/lib/libnccl.so.2")));
    }

    #[test]
    fn the_not_found_message_names_the_files_and_the_failed_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (venv, site_packages) = fake_venv(dir.path(), false);
        let search = nccl_candidates(&SearchInputs { venv: Some(venv), ..Default::default() });
        let failures: Vec<String> = search
            .candidates
            .iter()
            .map(|c| format!("{c}: cannot open shared object file: No such file or directory"))
            .collect();
        let message = not_found_message(&search, &failures);
        assert!(message.starts_with("the NCCL library (libnccl.so.2, from the nvidia-nccl-cu13 wheel) was not found"));
        assert!(
            message.contains(&site_packages.join("nvidia/nccl/lib/libnccl.so.2").display().to_string()),
            "{message}"
        );
        assert!(message.contains("libnccl.so.2 (system loader): cannot open shared object file"), "{message}");
    }

    #[test]
    fn nothing_to_go_on_is_not_an_error() {
        let search = nccl_candidates(&SearchInputs::default());
        assert!(search.missing.is_empty());
        assert_eq!(search.candidates.len(), NCCL_FILE_NAMES.len());
    }

    #[test]
    fn maps_parsing_keeps_paths_with_spaces_and_skips_anonymous_mappings() {
        let maps = "00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon\n\
                    7ffd1e1a3000-7ffd1e1c4000 rw-p 00000000 00:00 0                          [stack]\n\
                    7f0c2a000000-7f0c2a200000 rw-p 00000000 00:00 0 \n\
                    7f0c2b000000-7f0c2b200000 r-xp 00000000 08:01 42   /opt/my libs/libnccl.so.2.28.9\n";
        let paths: Vec<&Path> = mapped_paths(maps).collect();
        assert_eq!(paths, vec![Path::new("/usr/bin/dbus-daemon"), Path::new("/opt/my libs/libnccl.so.2.28.9")]);
        assert_eq!(mapped_library(maps, "libnccl.so"), Some(PathBuf::from("/opt/my libs/libnccl.so.2.28.9")));
        assert_eq!(mapped_library(maps, "libcudart.so"), None);
    }
}
