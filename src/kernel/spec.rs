//! Kernelspecs: discovery in the Jupyter data directories and the language -> kernel
//! mapping (contract §6.1, §6.2).
//!
//! A kernelspec is a directory `<data dir>/kernels/<name>/` holding `kernel.json`
//! (`argv`, `display_name`, `language`, optional `env`, `interrupt_mode`). Directories
//! are searched in Jupyter's order (the first hit of a name wins): the `--kernelspec-dir`
//! flags, `$JUPYTER_PATH`, the user's data dir, guestd's kernel venv, then the system
//! dirs. Specs are read at context creation, so kernels installed later are found
//! without restarting guestd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where `packaging/kernels/install.sh` installs its kernelspecs by default (the data
/// dir of guestd's kernel venv).
pub const GUESTD_VENV_KERNELS: &str = "/opt/guestd/python/share/jupyter/kernels";

/// How a kernel wants to be interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterruptMode {
    /// SIGINT to the kernel's process group.
    #[default]
    Signal,
    /// `interrupt_request` on the control channel.
    Message,
}

/// A resolved kernelspec.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub name: String,
    pub resource_dir: PathBuf,
    pub argv: Vec<String>,
    pub display_name: String,
    pub language: String,
    pub env: BTreeMap<String, String>,
    pub interrupt_mode: InterruptMode,
}

#[derive(Deserialize)]
struct KernelJson {
    argv: Vec<String>,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    interrupt_mode: Option<String>,
}

impl KernelSpec {
    /// Reads `<dir>/kernel.json`; `name` is the directory name.
    pub fn load(dir: &Path) -> Result<KernelSpec, String> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join("kernel.json");
        let raw = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let json: KernelJson =
            serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", path.display()))?;
        if json.argv.is_empty() {
            return Err(format!("{}: empty argv", path.display()));
        }
        Ok(KernelSpec {
            name,
            resource_dir: dir.to_path_buf(),
            argv: json.argv,
            display_name: json.display_name,
            language: json.language,
            env: json.env,
            interrupt_mode: match json.interrupt_mode.as_deref() {
                Some("message") => InterruptMode::Message,
                _ => InterruptMode::Signal,
            },
        })
    }

    /// `argv` with `{connection_file}` and `{resource_dir}` substituted.
    /// Whether the kernel runs on ipykernel's `IPKernelApp`, which serves its channels
    /// over Unix sockets when the connection file says `"transport": "ipc"` (D70):
    /// Python's `-m ipykernel_launcher` / `-m ipykernel` and `-m bash_kernel`. Other
    /// kernels (Deno's Rust ZeroMQ has no IPC; JeroMQ emulates it over TCP; IRkernel
    /// builds IPC endpoints its own way) keep loopback TCP.
    pub fn speaks_ipc(&self) -> bool {
        const MODULES: &[&str] = &["ipykernel_launcher", "ipykernel", "bash_kernel"];
        self.argv
            .windows(2)
            .any(|w| w[0] == "-m" && MODULES.contains(&w[1].as_str()))
    }

    pub fn command_line(&self, connection_file: &Path) -> Vec<String> {
        let conn = connection_file.to_string_lossy();
        let res = self.resource_dir.to_string_lossy();
        self.argv
            .iter()
            .map(|a| {
                a.replace("{connection_file}", &conn)
                    .replace("{resource_dir}", &res)
            })
            .collect()
    }
}

/// Expands `$NAME` and `${NAME}` in a kernelspec `env` value from `lookup`, as Jupyter's
/// kernel manager does (`string.Template.safe_substitute`): `$$` is a literal `$`, and a
/// reference to a variable `lookup` does not know stays as written. This is how a
/// kernelspec puts a directory in front of the `PATH` the kernel would get.
pub fn expand_env_value(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let is_start = |c: char| c == '_' || c.is_ascii_alphabetic();
    let is_name = |c: char| c == '_' || c.is_ascii_alphanumeric();
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end)
                    if braced[..end].starts_with(is_start)
                        && braced[..end].chars().all(is_name) =>
                {
                    (&braced[..end], end + 2)
                }
                _ => ("", 0),
            }
        } else if after.starts_with(is_start) {
            let end = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
            (&after[..end], end)
        } else {
            ("", 0)
        };
        match (consumed, lookup(name)) {
            (n, Some(v)) if n > 0 => out.push_str(&v),
            _ => out.push_str(&rest[i..i + 1 + consumed]),
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// The ordered list of kernelspec directories (each holding `<name>/kernel.json`).
pub fn default_search_dirs(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.to_vec();
    if let Some(jp) = std::env::var_os("JUPYTER_PATH") {
        for p in std::env::split_paths(&jp) {
            if !p.as_os_str().is_empty() {
                dirs.push(p.join("kernels"));
            }
        }
    }
    let user_data = std::env::var_os("JUPYTER_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_DATA_HOME")
                .filter(|v| !v.is_empty())
                .map(|x| PathBuf::from(x).join("jupyter"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/jupyter"))
        });
    if let Some(u) = user_data {
        dirs.push(u.join("kernels"));
    }
    dirs.push(PathBuf::from(GUESTD_VENV_KERNELS));
    dirs.push(PathBuf::from("/usr/local/share/jupyter/kernels"));
    dirs.push(PathBuf::from("/usr/share/jupyter/kernels"));
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The language -> kernelspec-name candidates, tried in order (contract §6.2 says the
/// mapping is configuration). `GUESTD_KERNEL_MAP` (`lang=spec1|spec2,lang2=spec`)
/// overrides or adds entries.
#[derive(Debug, Clone)]
pub struct LanguageMap {
    entries: BTreeMap<String, Vec<String>>,
}

impl Default for LanguageMap {
    fn default() -> Self {
        let e = |l: &str, specs: &[&str]| {
            (
                l.to_string(),
                specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        LanguageMap {
            entries: BTreeMap::from([
                e("python", &["python3", "python"]),
                e("javascript", &["deno", "jslab", "javascript"]),
                e("typescript", &["deno", "tslab", "typescript"]),
                e("r", &["ir"]),
                e("bash", &["bash"]),
                e("java", &["java"]),
            ]),
        }
    }
}

impl LanguageMap {
    /// The default map with `spec` (`lang=a|b,lang2=c`) applied on top.
    pub fn with_overrides(spec: &str) -> LanguageMap {
        let mut map = LanguageMap::default();
        for entry in spec.split(',') {
            let Some((lang, specs)) = entry.split_once('=') else {
                continue;
            };
            let names: Vec<String> = specs
                .split('|')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            if !lang.trim().is_empty() && !names.is_empty() {
                map.entries.insert(lang.trim().to_lowercase(), names);
            }
        }
        map
    }

    /// From `GUESTD_KERNEL_MAP` if set, else the default.
    pub fn from_env() -> LanguageMap {
        match std::env::var("GUESTD_KERNEL_MAP") {
            Ok(v) => LanguageMap::with_overrides(&v),
            Err(_) => LanguageMap::default(),
        }
    }

    /// Kernelspec names to try for a normalized language: the configured candidates,
    /// else a kernelspec named like the language.
    pub fn candidates(&self, language: &str) -> Vec<String> {
        self.entries
            .get(language)
            .cloned()
            .unwrap_or_else(|| vec![language.to_string()])
    }
}

/// Finds kernelspecs for languages.
#[derive(Debug, Clone)]
pub struct SpecResolver {
    pub dirs: Vec<PathBuf>,
    pub languages: LanguageMap,
}

impl SpecResolver {
    /// The spec named `name` in the first directory that has a valid one.
    pub fn find_by_name(&self, name: &str) -> Option<KernelSpec> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        for dir in &self.dirs {
            let d = dir.join(name);
            if !d.join("kernel.json").is_file() {
                continue;
            }
            match KernelSpec::load(&d) {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = %e, "ignoring invalid kernelspec"),
            }
        }
        None
    }

    /// The kernelspec for a normalized language: a configured candidate name, else any
    /// spec whose `language` field equals the language (case-insensitive).
    pub fn resolve(&self, language: &str) -> Option<KernelSpec> {
        for name in self.languages.candidates(language) {
            if let Some(s) = self.find_by_name(&name) {
                return Some(s);
            }
        }
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for d in names {
                if let Ok(s) = KernelSpec::load(&d)
                    && s.language.eq_ignore_ascii_case(language)
                {
                    return Some(s);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_spec(root: &Path, name: &str, json: &str) {
        std::fs::create_dir_all(root.join(name)).expect("mkdir");
        std::fs::write(root.join(name).join("kernel.json"), json).expect("write");
    }

    #[test]
    fn resolves_by_candidate_then_language_field() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        write_spec(
            a.path(),
            "python3",
            r#"{"argv": ["a", "{connection_file}", "{resource_dir}/x"], "language": "python"}"#,
        );
        write_spec(
            b.path(),
            "python3",
            r#"{"argv": ["b"], "language": "python"}"#,
        );
        write_spec(
            b.path(),
            "weird-r",
            r#"{"argv": ["R"], "language": "R", "interrupt_mode": "message"}"#,
        );
        write_spec(b.path(), "broken", r#"{"argv": []}"#);
        let r = SpecResolver {
            dirs: vec![a.path().to_path_buf(), b.path().to_path_buf()],
            languages: LanguageMap::default(),
        };
        let py = r.resolve("python").expect("python");
        assert_eq!(py.argv[0], "a");
        assert_eq!(py.interrupt_mode, InterruptMode::Signal);
        let cl = py.command_line(Path::new("/tmp/c.json"));
        assert_eq!(cl[1], "/tmp/c.json");
        assert_eq!(cl[2], format!("{}/x", a.path().join("python3").display()));
        assert!(!py.speaks_ipc(), "{:?}", py.argv);
        let rr = r.resolve("r").expect("r by language field");
        assert_eq!(rr.name, "weird-r");
        assert_eq!(rr.interrupt_mode, InterruptMode::Message);
        assert!(r.resolve("cobol").is_none());
        assert!(r.find_by_name("broken").is_none());
        assert!(r.find_by_name("../x").is_none());
    }

    #[test]
    fn ipc_only_for_ipykernel_apps() {
        let spec = |argv: &[&str]| KernelSpec {
            name: "k".into(),
            resource_dir: PathBuf::new(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            display_name: String::new(),
            language: String::new(),
            env: BTreeMap::new(),
            interrupt_mode: InterruptMode::Signal,
        };
        let f = "{connection_file}";
        assert!(spec(&["python", "-m", "ipykernel_launcher", "-f", f]).speaks_ipc());
        assert!(spec(&["/v/bin/python3", "-m", "ipykernel", "-f", f]).speaks_ipc());
        assert!(spec(&["python", "-m", "bash_kernel", "-f", f]).speaks_ipc());
        assert!(!spec(&["deno", "jupyter", "--kernel", "--conn", f]).speaks_ipc());
        assert!(!spec(&["R", "--slave", "-e", "IRkernel::main()", "--args", f]).speaks_ipc());
        assert!(!spec(&["java", "-jar", "jjava-launcher.jar", f]).speaks_ipc());
        assert!(!spec(&["python", "my_ipykernel_fork.py", "-f", f]).speaks_ipc());
    }

    #[test]
    fn env_values_expand_like_jupyter() {
        let lookup = |k: &str| match k {
            "PATH" => Some("/usr/bin:/bin".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let x = |v: &str| expand_env_value(v, &lookup);
        assert_eq!(x("/opt/venv/bin:${PATH}"), "/opt/venv/bin:/usr/bin:/bin");
        assert_eq!(x("$PATH:/x"), "/usr/bin:/bin:/x");
        assert_eq!(x("a$EMPTY-b"), "a-b");
        assert_eq!(x("$$PATH"), "$PATH");
        assert_eq!(x("${UNKNOWN}/$UNKNOWN"), "${UNKNOWN}/$UNKNOWN");
        assert_eq!(x("cost: $5 ${ broken } $"), "cost: $5 ${ broken } $");
        assert_eq!(x("é$PATHé"), "é/usr/bin:/biné");
        assert_eq!(x("$PATHX ${PATH}é"), "$PATHX /usr/bin:/biné");
    }

    #[test]
    fn overrides() {
        let m = LanguageMap::with_overrides("javascript=deno|jslab, ruby = iruby ,bad");
        assert_eq!(m.candidates("javascript"), vec!["deno", "jslab"]);
        assert_eq!(m.candidates("ruby"), vec!["iruby"]);
        assert_eq!(m.candidates("python"), vec!["python3", "python"]);
        assert_eq!(m.candidates("zig"), vec!["zig"]);
    }
}
