//! Per-language knowledge: name normalization (contract §6.1) and the setup snippets
//! that set/unset environment variables and change directory (§5.5, §5.6). Every
//! value is embedded as a properly escaped literal of the target language; keys that
//! a language cannot express safely are rejected before anything runs.

/// Normalizes a requested language: empty -> `python`; trim, lowercase; `js` ->
/// `javascript`, `ts` -> `typescript`.
pub fn normalize(language: Option<&str>) -> String {
    let l = language.map(str::trim).unwrap_or("").to_lowercase();
    match l.as_str() {
        "" => "python".to_string(),
        "js" => "javascript".to_string(),
        "ts" => "typescript".to_string(),
        _ => l,
    }
}

/// Why an environment variable cannot be set for a language.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvKeyError {
    #[error("environment variable names and values cannot contain NUL bytes")]
    Nul,
    #[error("invalid environment variable name {0:?} for bash (must match [A-Za-z_][A-Za-z0-9_]*)")]
    NotIdentifier(String),
    #[error("environment variable names cannot be empty or contain '='")]
    BadName,
}

/// Checks that every key/value can be set in `language`.
pub fn validate_env<'a>(
    language: &str,
    vars: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), EnvKeyError> {
    for (k, v) in vars {
        if k.contains('\0') || v.contains('\0') {
            return Err(EnvKeyError::Nul);
        }
        if k.is_empty() || k.contains('=') {
            return Err(EnvKeyError::BadName);
        }
        if language == "bash" && !is_identifier(k) {
            return Err(EnvKeyError::NotIdentifier(k.to_string()));
        }
    }
    Ok(())
}

fn is_identifier(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A double-quoted literal valid in Python, JavaScript/TypeScript, R and Java: JSON
/// string syntax (escapes `\" \\ \n \r \t \b \f \u00XX`, other characters verbatim).
fn dq(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// A single-quoted bash word: `'…'` with each `'` written as `'\''`.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One change of the kernel's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvOp {
    Set(String, String),
    Unset(String),
}

/// Code that applies `ops` in `language`, or `None` when there is nothing to run or the
/// language has no way to do it (silently ignored, as the reference does).
pub fn env_code(language: &str, ops: &[EnvOp]) -> Option<String> {
    if ops.is_empty() {
        return None;
    }
    let mut lines: Vec<String> = Vec::with_capacity(ops.len() + 1);
    match language {
        "python" => {
            lines.push("import os as __guestd_os".to_string());
            for op in ops {
                lines.push(match op {
                    EnvOp::Set(k, v) => format!("__guestd_os.environ[{}] = {}", dq(k), dq(v)),
                    EnvOp::Unset(k) => format!("__guestd_os.environ.pop({}, None)", dq(k)),
                });
            }
            lines.push("del __guestd_os".to_string());
        }
        "javascript" | "typescript" => {
            for op in ops {
                lines.push(match op {
                    EnvOp::Set(k, v) => format!("process.env[{}] = {};", dq(k), dq(v)),
                    EnvOp::Unset(k) => format!("delete process.env[{}];", dq(k)),
                });
            }
        }
        "r" => {
            for op in ops {
                lines.push(match op {
                    EnvOp::Set(k, v) => format!(
                        "invisible(do.call(Sys.setenv, setNames(list({}), {})))",
                        dq(v),
                        dq(k)
                    ),
                    EnvOp::Unset(k) => format!("invisible(Sys.unsetenv({}))", dq(k)),
                });
            }
        }
        "bash" => {
            for op in ops {
                match op {
                    EnvOp::Set(k, v) if is_identifier(k) => {
                        lines.push(format!("export {k}={}", sq(v)))
                    }
                    EnvOp::Unset(k) if is_identifier(k) => lines.push(format!("unset {k}")),
                    // Never paste a non-identifier into shell code (validated earlier
                    // for per-execution vars; global ones are skipped).
                    _ => tracing::warn!(
                        "skipping environment variable that is not a bash identifier"
                    ),
                }
            }
        }
        "java" => {
            for op in ops {
                lines.push(match op {
                    EnvOp::Set(k, v) => format!("System.setProperty({}, {});", dq(k), dq(v)),
                    EnvOp::Unset(k) => format!("System.clearProperty({});", dq(k)),
                });
            }
        }
        _ => return None,
    }
    if lines.is_empty() || (language == "python" && lines.len() == 2) {
        return None;
    }
    Some(lines.join("\n"))
}

/// Code that changes the kernel's working directory to `cwd` (the process was also
/// spawned there), or `None` for languages without such a statement.
pub fn chdir_code(language: &str, cwd: &str) -> Option<String> {
    match language {
        "python" => Some(format!("__import__('os').chdir({})", dq(cwd))),
        "javascript" | "typescript" => Some(format!("process.chdir({});", dq(cwd))),
        "r" => Some(format!("invisible(setwd({}))", dq(cwd))),
        "bash" => Some(format!("cd -- {}", sq(cwd))),
        "java" => Some(format!("System.setProperty(\"user.dir\", {});", dq(cwd))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        assert_eq!(normalize(None), "python");
        assert_eq!(normalize(Some("")), "python");
        assert_eq!(normalize(Some("  JS ")), "javascript");
        assert_eq!(normalize(Some("ts")), "typescript");
        assert_eq!(normalize(Some("R")), "r");
        assert_eq!(normalize(Some("node")), "node");
    }

    #[test]
    fn env_validation() {
        assert!(validate_env("python", [("A B", "x")]).is_ok());
        assert_eq!(
            validate_env("bash", [("A B", "x")]),
            Err(EnvKeyError::NotIdentifier("A B".into()))
        );
        assert!(validate_env("bash", [("_A1", "$(rm -rf /)")]).is_ok());
        assert_eq!(validate_env("r", [("A", "x\0")]), Err(EnvKeyError::Nul));
        assert_eq!(validate_env("r", [("", "x")]), Err(EnvKeyError::BadName));
        assert_eq!(validate_env("r", [("A=B", "x")]), Err(EnvKeyError::BadName));
    }

    #[test]
    fn snippets_escape_values() {
        let ops = [
            EnvOp::Set("K".into(), "it's \"q\"\n\\ é".into()),
            EnvOp::Unset("G".into()),
        ];
        assert_eq!(
            env_code("python", &ops).unwrap(),
            "import os as __guestd_os\n__guestd_os.environ[\"K\"] = \"it's \\\"q\\\"\\n\\\\ é\"\n__guestd_os.environ.pop(\"G\", None)\ndel __guestd_os"
        );
        assert_eq!(
            env_code("bash", &ops).unwrap(),
            "export K='it'\\''s \"q\"\n\\ é'\nunset G"
        );
        assert_eq!(
            env_code("javascript", &ops).unwrap(),
            "process.env[\"K\"] = \"it's \\\"q\\\"\\n\\\\ é\";\ndelete process.env[\"G\"];"
        );
        assert!(env_code("r", &ops).unwrap().contains("Sys.unsetenv(\"G\")"));
        assert!(
            env_code("java", &ops)
                .unwrap()
                .contains("System.clearProperty(\"G\");")
        );
        assert_eq!(env_code("cobol", &ops), None);
        assert_eq!(env_code("python", &[]), None);
        assert_eq!(env_code("bash", &[EnvOp::Unset("not ok".into())]), None);
    }

    #[test]
    fn chdir_snippets() {
        assert_eq!(
            chdir_code("bash", "/tmp/a'b").unwrap(),
            "cd -- '/tmp/a'\\''b'"
        );
        assert_eq!(
            chdir_code("python", "/home/user").unwrap(),
            "__import__('os').chdir(\"/home/user\")"
        );
        assert_eq!(chdir_code("zig", "/"), None);
    }
}
