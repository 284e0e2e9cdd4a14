//! `paths::resolve` (contract §2.4): `~`, `~user`, `.`/`..`, empty segments, NUL,
//! invalid UTF-8 (through the `/files` query, which decodes lossily), names and paths
//! over the kernel's limits, then `Stat` and `ListDir` on the result inside a scratch
//! tree with symlink loops, dangling and chained links, a FIFO and a non-UTF-8 name.
//!
//! Resolution uses the production home `/home/user`; the result is then mapped into
//! the scratch tree (never a path with `..`, so the kernel only ever walks inside it).

use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};

use guestd::api::files::{FilesError, FilesQuery};
use guestd::filesystem::{list_dir, stat};
use guestd::paths::{PathError, normalize, resolve};
use guestd::sys::users::{User, UserDb, UserError};

#[derive(Arbitrary, Debug)]
enum Part {
    Tilde,
    TildeUser(String),
    Dot,
    DotDot,
    Slash,
    Name(String),
    /// A name of this many bytes (kernel limit: 255 per name, 4096 per path).
    Long(u16),
    Nul,
    Raw(Vec<u8>),
    Known(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    parts: Vec<Part>,
    /// Send the path through the `/files` query string (percent-encoded bytes).
    via_query: bool,
    workdir: Option<String>,
    depth: u8,
}

const KNOWN: &[&str] = &[
    "a.txt",
    "dir",
    "dir/sub",
    "loop",
    "dangling",
    "up",
    "top",
    "chain1",
    "fifo",
    "dir/b.txt",
    "self",
    "deep",
];

struct NoUsers;

impl UserDb for NoUsers {
    fn user_by_name(&self, name: &str) -> Result<User, UserError> {
        Err(UserError::Unknown(name.to_string()))
    }
    fn user_name(&self, uid: u32) -> Option<String> {
        (uid == 0).then(|| "root".to_string())
    }
    fn group_name(&self, gid: u32) -> Option<String> {
        (gid == 0).then(|| "root".to_string())
    }
}

/// `<scratch>/jail/root`, the stand-in for `/`, with `/home/user` populated.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = crate::scratch_dir("paths").join("jail/root");
        let home = root.join("home/user");
        let mk = |p: &Path| std::fs::create_dir_all(p).expect("mkdir");
        mk(&home.join("dir/sub/deeper"));
        mk(&root.join("work"));
        std::fs::write(home.join("a.txt"), b"a").expect("write");
        std::fs::write(home.join("dir/b.txt"), b"b").expect("write");
        let link = |target: &str, name: &str| {
            let _ = std::os::unix::fs::symlink(target, home.join(name));
        };
        link("loop", "loop");
        link("nowhere", "dangling");
        link("..", "up");
        link("../..", "top");
        link("chain2", "chain1");
        link("dir", "chain2");
        link(".", "self");
        link("dir/sub/deeper", "deep");
        let _ = nix::unistd::mkfifo(
            &home.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        );
        let odd = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
        std::fs::write(home.join(odd), b"x").expect("write");
        root
    })
}

fn render(parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            Part::Tilde => out.push(b'~'),
            Part::TildeUser(u) => {
                out.push(b'~');
                out.extend_from_slice(u.as_bytes());
            }
            Part::Dot => out.push(b'.'),
            Part::DotDot => out.extend_from_slice(b".."),
            Part::Slash => out.push(b'/'),
            Part::Name(n) => out.extend_from_slice(n.as_bytes()),
            Part::Long(n) => out.extend(std::iter::repeat_n(b'x', usize::from(*n) % 5000)),
            Part::Nul => out.push(0),
            Part::Raw(r) => out.extend_from_slice(r),
            Part::Known(i) => {
                out.extend_from_slice(KNOWN[usize::from(*i) % KNOWN.len()].as_bytes())
            }
        }
    }
    out
}

fn is_normal(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let raw = render(&input.parts);
    let text = if input.via_query {
        let enc: String =
            percent_encoding::percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC).to_string();
        // http::Uri refuses URIs over 64 KiB (hyper answers 414 before any handler).
        let Ok(uri) = format!("/files?path={enc}").parse::<http::Uri>() else {
            return;
        };
        match FilesQuery::parse(&uri) {
            Ok(q) => q.path.unwrap_or_default(),
            Err(FilesError { message, .. }) => {
                panic!("a lone path parameter was refused: {message}")
            }
        }
    } else {
        String::from_utf8_lossy(&raw).into_owned()
    };
    let home = Path::new("/home/user");
    // The workdir comes from /init, not from the request: never with NUL here.
    let workdir_text = input.workdir.as_ref().map(|w| w.replace('\0', ""));
    let workdir = workdir_text.as_deref().map(Path::new);
    let result = resolve(&text, home, workdir);
    let effective = if text.is_empty() {
        workdir_text.clone().unwrap_or_default()
    } else {
        text.clone()
    };
    let resolved = match result {
        Err(PathError::Nul) => {
            assert!(text.contains('\0'), "NUL error without a NUL");
            return;
        }
        Err(e @ PathError::UserHome(_)) => {
            assert!(effective.starts_with('~') && effective != "~" && !effective.starts_with("~/"));
            assert!(
                e.to_string()
                    .contains("cannot expand user-specific home dir")
            );
            return;
        }
        Ok(p) => p,
    };
    assert!(!text.contains('\0'), "a path with NUL resolved");
    assert!(!resolved.as_os_str().as_bytes().contains(&0));
    if effective.starts_with('/') {
        assert_eq!(
            resolved.as_os_str().as_bytes(),
            effective.as_bytes(),
            "absolute paths are verbatim"
        );
    } else {
        assert!(
            resolved.is_absolute(),
            "{effective:?} resolved to relative {resolved:?}"
        );
        assert!(
            is_normal(&resolved),
            "{effective:?} resolved to unnormalized {resolved:?}"
        );
    }
    let n = normalize(&resolved);
    assert_eq!(normalize(&n), n, "normalize is not idempotent");

    // The filesystem side, inside the scratch tree only.
    if !resolved.is_absolute() || resolved.components().any(|c| c == Component::ParentDir) {
        return;
    }
    let rel = resolved.strip_prefix("/").expect("absolute");
    let real = root().join(rel);
    let users = NoUsers;
    match stat(&real, &users) {
        Ok(info) => assert_eq!(info.path, real, "Stat names another path"),
        Err(e) => {
            let f = FilesError::from(e);
            assert!(!f.message.is_empty(), "Stat error without a message");
        }
    }
    let depth = u32::from(input.depth % 4);
    match list_dir(&real, depth, &users) {
        Ok(entries) => {
            for e in entries {
                assert!(!e.name.is_empty());
            }
        }
        Err(e) => {
            let f = FilesError::from(e);
            assert!(!f.message.is_empty(), "ListDir error without a message");
        }
    }
}
