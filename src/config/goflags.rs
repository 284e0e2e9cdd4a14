//! The reference agent's command line, read the way Go's `flag` package reads it.
//!
//! envd parses its flags with Go's `flag` package, and the engines that run it today
//! spell them accordingly: `-port 49983`, `--port=49983`, `-isnotfc`, `-verbose`,
//! `-cgroup-root DIR`, `-version`. clap would read `-isnotfc` as the short flag `-i`
//! with a value, so the command line is first rewritten here into clap's canonical
//! `--name` / `--name=value` tokens, following Go's rules exactly:
//!
//! * one or two dashes mean the same flag; `---x`, `-=x` and `--=x` are bad syntax;
//! * a value is `-name=value` or, for flags that take one, the next argument (taken
//!   as it is, even when it starts with a dash);
//! * a boolean flag never takes the next argument; `-name=value` accepts what Go's
//!   `strconv.ParseBool` does (`1 t T TRUE true True 0 f F FALSE false False`);
//! * the last occurrence of a flag wins (repeatable list flags keep every value);
//! * parsing stops at `--` (consumed) or at the first argument that is not a flag
//!   (`-` alone is not a flag); what follows is returned as `ignored`, because the
//!   reference ignores it too;
//! * `-h`, `-help` and `--help` ask for the help text; an undefined flag is an error.
//!
//! The flag table is clap's own ([`clap::Command`]), so every flag guestd gains is
//! accepted in all these spellings without a change here. Single-letter names also
//! match clap's short flags (`-V`). The reference's integer flag `port` additionally
//! accepts Go's integer syntax (`0x`, `0o`, `0b` prefixes, a leading `0` for octal,
//! `_` between digits), converted to decimal for clap.

use std::ffi::{OsStr, OsString};

use clap::ArgAction;

/// Flags whose values the reference parses as Go integers (`strconv.ParseInt(s, 0, 64)`).
const GO_INT_FLAGS: &[&str] = &["port"];

/// A command line in clap's canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The program name followed by `--name` and `--name=value` tokens.
    pub args: Vec<OsString>,
    /// Arguments after the flags: Go's `flag` package stops at the first non-flag
    /// argument (or after `--`), and the reference ignores everything from there on.
    pub ignored: Vec<OsString>,
}

/// A command line Go's `flag` package would refuse. The messages are Go's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    #[error("flag provided but not defined: -{0}")]
    Undefined(String),
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid boolean value {value:?} for -{name}: parse error")]
    InvalidBool { name: String, value: String },
    #[error("invalid value {value:?} for flag -{name}: {reason}")]
    InvalidValue {
        name: String,
        value: String,
        reason: &'static str,
    },
    #[error("flag is not valid UTF-8: {0:?}")]
    NotUnicode(OsString),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A switch: `-name` or `-name=<bool>`.
    Bool,
    /// One value; a later occurrence replaces an earlier one.
    Value,
    /// A value per occurrence, all kept.
    List,
}

/// Rewrites `args` (program name first, as from `std::env::args_os`) into clap's
/// canonical spelling using `cmd`'s flag table.
pub fn normalize<I>(cmd: &clap::Command, args: I) -> Result<Normalized, FlagError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut args = args.into_iter().map(Into::into);
    let program = args.next().unwrap_or_else(|| OsString::from("guestd"));
    let rest: Vec<OsString> = args.collect();

    // Flags in first-seen order: (clap long name, kind, values).
    let mut bools: Vec<(String, bool)> = Vec::new();
    let mut values: Vec<(String, OsString)> = Vec::new();
    let mut ignored = Vec::new();

    let mut i = 0;
    while i < rest.len() {
        let raw = &rest[i];
        let bytes = raw.as_encoded_bytes();
        if bytes.len() < 2 || bytes[0] != b'-' {
            // Not a flag (or "-" alone): Go stops here.
            ignored.extend_from_slice(&rest[i..]);
            break;
        }
        if bytes == b"--" {
            ignored.extend_from_slice(&rest[i + 1..]);
            break;
        }
        let s = raw
            .to_str()
            .ok_or_else(|| FlagError::NotUnicode(raw.clone()))?;
        i += 1;
        let dashes = if s.starts_with("--") { 2 } else { 1 };
        let body = &s[dashes..];
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(FlagError::BadSyntax(s.to_string()));
        }
        let (name, inline) = match body.find('=') {
            Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
            None => (body, None),
        };
        let Some((long, kind)) = lookup(cmd, name) else {
            if name == "help" || name == "h" {
                return Ok(Normalized {
                    args: vec![program, OsString::from("--help")],
                    ignored: Vec::new(),
                });
            }
            return Err(FlagError::Undefined(name.to_string()));
        };
        match kind {
            Kind::Bool => {
                let on = match inline {
                    None => true,
                    Some(v) => parse_go_bool(v).ok_or_else(|| FlagError::InvalidBool {
                        name: name.to_string(),
                        value: v.to_string(),
                    })?,
                };
                match bools.iter_mut().find(|(n, _)| *n == long) {
                    Some(entry) => entry.1 = on,
                    None => bools.push((long, on)),
                }
            }
            Kind::Value | Kind::List => {
                let value: OsString = match inline {
                    Some(v) => v.into(),
                    None => match rest.get(i) {
                        Some(next) => {
                            i += 1;
                            next.clone()
                        }
                        None => return Err(FlagError::MissingValue(name.to_string())),
                    },
                };
                let value = if GO_INT_FLAGS.contains(&long.as_str()) {
                    go_int_value(name, &value)?
                } else {
                    value
                };
                match (kind, values.iter_mut().find(|(n, _)| *n == long)) {
                    (Kind::Value, Some(entry)) => entry.1 = value,
                    _ => values.push((long, value)),
                }
            }
        }
    }

    let mut out = vec![program];
    for (long, on) in bools {
        if on {
            out.push(OsString::from(format!("--{long}")));
        }
    }
    for (long, value) in values {
        let mut token = OsString::from(format!("--{long}="));
        token.push(&value);
        out.push(token);
    }
    Ok(Normalized { args: out, ignored })
}

/// The clap flag a Go-style name refers to: its long name (or a single letter that is
/// a short flag) and how it takes values.
fn lookup(cmd: &clap::Command, name: &str) -> Option<(String, Kind)> {
    let mut chars = name.chars();
    let short = match (chars.next(), chars.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    };
    cmd.get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let by_long = long == name
            || arg
                .get_all_aliases()
                .is_some_and(|aliases| aliases.contains(&name));
        let by_short = short.is_some() && arg.get_short() == short;
        if !(by_long || by_short) {
            return None;
        }
        let action = arg.get_action();
        let kind = match action {
            ArgAction::Append => Kind::List,
            a if a.takes_values() => Kind::Value,
            _ => Kind::Bool,
        };
        Some((long.to_string(), kind))
    })
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn go_int_value(name: &str, value: &OsStr) -> Result<OsString, FlagError> {
    let invalid = |reason| FlagError::InvalidValue {
        name: name.to_string(),
        value: value.to_string_lossy().into_owned(),
        reason,
    };
    let s = value.to_str().ok_or_else(|| invalid("parse error"))?;
    parse_go_int(s)
        .map(|n| OsString::from(n.to_string()))
        .map_err(invalid)
}

/// Go's `strconv.ParseInt(s, 0, 64)`: an optional sign, then a decimal number, or one
/// with a `0x`/`0o`/`0b` prefix, or a leading `0` for octal; `_` may separate digits
/// (and follow a prefix). Errors are Go's texts.
pub fn parse_go_int(s: &str) -> Result<i64, &'static str> {
    let (negative, unsigned) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = unsigned.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d, true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d, true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d, true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..], true)
    } else {
        (10, lower.as_str(), false)
    };
    if !underscores_ok(digits, prefixed) {
        return Err("parse error");
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_digit(radix)) {
        return Err("parse error");
    }
    let magnitude = u64::from_str_radix(&clean, radix).map_err(|_| "value out of range")?;
    if negative {
        if magnitude > i64::MAX as u64 + 1 {
            return Err("value out of range");
        }
        Ok((magnitude as i128).wrapping_neg() as i64)
    } else {
        i64::try_from(magnitude).map_err(|_| "value out of range")
    }
}

/// Go's rule for `_` in base-0 numbers: each underscore sits between two digits, where
/// a base prefix counts as a digit.
fn underscores_ok(digits: &str, prefixed: bool) -> bool {
    let mut prev_digit = prefixed;
    let mut prev_underscore = false;
    for c in digits.chars() {
        if c == '_' {
            if !prev_digit {
                return false;
            }
            prev_digit = false;
            prev_underscore = true;
        } else {
            prev_digit = true;
            prev_underscore = false;
        }
    }
    !prev_underscore
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    /// A flag table like guestd's: the reference's flags and a few of guestd's own.
    fn table() -> Command {
        Command::new("guestd")
            .arg(Arg::new("port").long("port").action(ArgAction::Set))
            .arg(
                Arg::new("isnotfc")
                    .long("isnotfc")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("no-cgroups")
                    .long("no-cgroups")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("cgroup-root")
                    .long("cgroup-root")
                    .action(ArgAction::Set),
            )
            .arg(
                Arg::new("version")
                    .long("version")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("commit").long("commit").action(ArgAction::SetTrue))
            .arg(
                Arg::new("guestd-version")
                    .long("guestd-version")
                    .short('V')
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("kernelspec-dir")
                    .long("kernelspec-dir")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("log-format")
                    .long("log-format")
                    .action(ArgAction::Set),
            )
    }

    fn norm(args: &[&str]) -> Result<Normalized, FlagError> {
        let mut argv = vec!["guestd"];
        argv.extend_from_slice(args);
        normalize(&table(), argv)
    }

    fn ok(args: &[&str]) -> Vec<String> {
        let n = norm(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(n.ignored.is_empty(), "{args:?} ignored {:?}", n.ignored);
        n.args[1..]
            .iter()
            .map(|a| a.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn every_spelling_of_a_value_flag() {
        for spelling in [
            &["-port", "49983"][..],
            &["--port", "49983"],
            &["-port=49983"],
            &["--port=49983"],
        ] {
            assert_eq!(ok(spelling), ["--port=49983"], "{spelling:?}");
        }
        for spelling in [
            &["-cgroup-root", "/sys/fs/cgroup"][..],
            &["--cgroup-root", "/sys/fs/cgroup"],
            &["-cgroup-root=/sys/fs/cgroup"],
            &["--cgroup-root=/sys/fs/cgroup"],
        ] {
            assert_eq!(
                ok(spelling),
                ["--cgroup-root=/sys/fs/cgroup"],
                "{spelling:?}"
            );
        }
    }

    #[test]
    fn every_spelling_of_a_bool_flag() {
        for flag in ["isnotfc", "verbose", "no-cgroups", "version", "commit"] {
            let want = [format!("--{flag}")];
            for spelling in [format!("-{flag}"), format!("--{flag}")] {
                assert_eq!(ok(&[&spelling]), want, "{spelling}");
            }
            for t in ["1", "t", "T", "TRUE", "true", "True"] {
                assert_eq!(ok(&[&format!("-{flag}={t}")]), want);
                assert_eq!(ok(&[&format!("--{flag}={t}")]), want);
            }
            for f in ["0", "f", "F", "FALSE", "false", "False"] {
                assert!(ok(&[&format!("-{flag}={f}")]).is_empty());
                assert!(ok(&[&format!("--{flag}={f}")]).is_empty());
            }
        }
    }

    #[test]
    fn the_engines_command_lines() {
        // kubernetes-sigs/agent-sandbox's envd example.
        assert_eq!(
            ok(&["--isnotfc", "--no-cgroups", "--port", "49983", "--verbose"]),
            ["--isnotfc", "--no-cgroups", "--verbose", "--port=49983"]
        );
        // OpenKruise's postStart hook.
        assert_eq!(ok(&["-isnotfc"]), ["--isnotfc"]);
        // guestd's own flags in Go spellings, mixed with clap's.
        assert_eq!(
            ok(&[
                "-log-format",
                "json",
                "--kernelspec-dir=/a",
                "-kernelspec-dir",
                "/b"
            ]),
            [
                "--log-format=json",
                "--kernelspec-dir=/a",
                "--kernelspec-dir=/b"
            ]
        );
        assert_eq!(ok(&["-V"]), ["--guestd-version"]);
    }

    #[test]
    fn a_bool_flag_never_takes_the_next_argument() {
        // Go: `-isnotfc true` sets the flag and stops at the non-flag "true".
        let n = norm(&["-isnotfc", "true", "-port", "1"]).unwrap();
        assert_eq!(n.args, ["guestd", "--isnotfc"]);
        assert_eq!(n.ignored, ["true", "-port", "1"]);
    }

    #[test]
    fn a_value_is_the_next_argument_even_with_a_dash() {
        assert_eq!(ok(&["-cgroup-root", "-weird"]), ["--cgroup-root=-weird"]);
        assert_eq!(ok(&["-cgroup-root="]), ["--cgroup-root="]);
        // An `=` inside the value stays in the value.
        assert_eq!(ok(&["-cgroup-root=a=b"]), ["--cgroup-root=a=b"]);
    }

    #[test]
    fn last_occurrence_wins_and_lists_keep_all() {
        assert_eq!(ok(&["-port", "1", "--port=2"]), ["--port=2"]);
        assert!(ok(&["-verbose", "-verbose=false"]).is_empty());
        assert_eq!(ok(&["-verbose=false", "-verbose"]), ["--verbose"]);
        assert_eq!(
            ok(&["-kernelspec-dir", "a", "-kernelspec-dir", "b"]),
            ["--kernelspec-dir=a", "--kernelspec-dir=b"]
        );
    }

    #[test]
    fn parsing_stops_at_the_first_non_flag_or_after_double_dash() {
        let n = norm(&["-isnotfc", "serve", "-verbose"]).unwrap();
        assert_eq!(n.args, ["guestd", "--isnotfc"]);
        assert_eq!(n.ignored, ["serve", "-verbose"]);
        let n = norm(&["-isnotfc", "--", "-verbose"]).unwrap();
        assert_eq!(n.args, ["guestd", "--isnotfc"]);
        assert_eq!(n.ignored, ["-verbose"]);
        let n = norm(&["-", "-verbose"]).unwrap();
        assert_eq!(n.args, ["guestd"]);
        assert_eq!(n.ignored, ["-", "-verbose"]);
    }

    #[test]
    fn errors_are_gos() {
        assert_eq!(
            norm(&["-verbos"]).unwrap_err().to_string(),
            "flag provided but not defined: -verbos"
        );
        assert_eq!(
            norm(&["--i"]).unwrap_err(),
            FlagError::Undefined("i".into())
        );
        assert_eq!(
            norm(&["---port=1"]).unwrap_err().to_string(),
            "bad flag syntax: ---port=1"
        );
        assert_eq!(
            norm(&["-=1"]).unwrap_err(),
            FlagError::BadSyntax("-=1".into())
        );
        assert_eq!(
            norm(&["--=1"]).unwrap_err(),
            FlagError::BadSyntax("--=1".into())
        );
        assert_eq!(
            norm(&["-port"]).unwrap_err().to_string(),
            "flag needs an argument: -port"
        );
        assert_eq!(
            norm(&["-isnotfc=yes"]).unwrap_err().to_string(),
            "invalid boolean value \"yes\" for -isnotfc: parse error"
        );
        assert_eq!(
            norm(&["-port", "http"]).unwrap_err().to_string(),
            "invalid value \"http\" for flag -port: parse error"
        );
        assert_eq!(
            norm(&["-port=99999999999999999999"])
                .unwrap_err()
                .to_string(),
            "invalid value \"99999999999999999999\" for flag -port: value out of range"
        );
        // Single letters match only short flags; clap's bundling is not Go's.
        assert_eq!(norm(&["-i"]).unwrap_err(), FlagError::Undefined("i".into()));
        assert_eq!(
            norm(&["-Vx"]).unwrap_err(),
            FlagError::Undefined("Vx".into())
        );
    }

    #[test]
    fn help_in_every_spelling() {
        for h in ["-h", "--h", "-help", "--help", "-help=false"] {
            let n = norm(&["-isnotfc", h, "-bogus"]).unwrap();
            assert_eq!(n.args, ["guestd", "--help"], "{h}");
        }
    }

    #[test]
    fn port_takes_gos_integer_syntax() {
        for (spelling, want) in [
            ("49983", "49983"),
            ("+49983", "49983"),
            ("0xC33F", "49983"),
            ("0Xc33f", "49983"),
            ("0o141477", "49983"),
            ("0141477", "49983"),
            ("0b1100001100111111", "49983"),
            ("49_983", "49983"),
            ("0x_C3_3F", "49983"),
            ("0", "0"),
            ("-1", "-1"),
        ] {
            assert_eq!(
                ok(&["-port", spelling]),
                [format!("--port={want}")],
                "{spelling}"
            );
        }
        for bad in [
            "", "_1", "1_", "1__2", "0x", "0b2", "08", "1e3", " 1", "0x_",
        ] {
            assert!(parse_go_int(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse_go_int("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(
            parse_go_int("9223372036854775808"),
            Err("value out of range")
        );
    }

    #[test]
    fn the_program_name_is_kept_and_values_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt as _;
        let odd = OsString::from_vec(vec![b'/', 0xff, b'x']);
        let n = normalize(
            &table(),
            [OsString::from("/usr/bin/envd"), "-cgroup-root".into(), odd],
        )
        .unwrap();
        assert_eq!(n.args[0], "/usr/bin/envd");
        assert_eq!(
            n.args[1].as_encoded_bytes(),
            b"--cgroup-root=/\xffx".as_slice()
        );
        let bad_flag = OsString::from_vec(vec![b'-', 0xff]);
        assert!(matches!(
            normalize(&table(), [OsString::from("guestd"), bad_flag]),
            Err(FlagError::NotUnicode(_))
        ));
    }
}
