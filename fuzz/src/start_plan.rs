//! The pure part of `Start` (`process::plan::build`): argv, the layered environment,
//! `PATH` search candidates and the cwd as C strings. A NUL anywhere is an error that
//! names the culprit; otherwise argv and env carry the request verbatim.

use std::collections::BTreeMap;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};

use guestd::process::plan::{ExecTarget, build};
use guestd::process::{CommandConfig, StartSpec};
use guestd::sys::users::User;

#[derive(Arbitrary, Debug)]
struct Input {
    cmd: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    global: Vec<(String, String)>,
    cwd: String,
    agent_path: String,
    euid: u32,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let envs: BTreeMap<String, String> = input.envs.iter().cloned().collect();
    let spec = StartSpec {
        config: CommandConfig {
            cmd: input.cmd.clone(),
            args: input.args.clone(),
            envs: envs.clone(),
            cwd: None,
        },
        cwd: PathBuf::from(&input.cwd),
        user: User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            home: PathBuf::from("/home/user"),
            shell: PathBuf::from("/bin/bash"),
        },
        global_env: input.global.clone(),
        pty: None,
        stdin: false,
        tag: None,
        timeout: None,
    };
    let plan = match build(&spec, &input.agent_path, input.euid, 0) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.to_string().contains("contains a NUL byte"));
            return;
        }
    };
    assert_eq!(plan.argv.len(), input.args.len() + 1);
    assert_eq!(plan.argv[0].as_bytes(), input.cmd.as_bytes());
    for (a, b) in plan.argv[1..].iter().zip(&input.args) {
        assert_eq!(a.as_bytes(), b.as_bytes());
    }
    // The request's variables win over every other layer.
    for (k, v) in &envs {
        let got = plan.env.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        assert_eq!(got, Some(v), "request variable {k:?}");
    }
    assert_eq!(plan.env.len(), plan.envp.len());
    match &plan.exec {
        ExecTarget::NotFound => assert!(input.cmd.is_empty()),
        ExecTarget::Path(p) => assert_eq!(p.as_bytes(), input.cmd.as_bytes()),
        ExecTarget::Search(list) => assert!(!list.is_empty()),
    }
}
