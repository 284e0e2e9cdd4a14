//! Parsers of kernel-made text: `/proc/stat` and `/proc/meminfo` (metrics) and
//! `/proc/net/tcp{,6}` (port forwarding). Their input is not the client's, but a parser
//! must not panic on any text (an unusual kernel, a container's fake `/proc`).

use arbitrary::{Arbitrary, Unstructured};

use guestd::metrics::source::{parse_meminfo, parse_proc_stat};
use guestd::portfwd::scan::{Family, loopback_only, parse};

#[derive(Arbitrary, Debug)]
struct Input {
    which: u8,
    exclude: Vec<u16>,
    text: String,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input.which % 4 {
        0 => {
            if let Some(t) = parse_proc_stat(&input.text) {
                assert!(t.busy <= t.total, "busy {} > total {}", t.busy, t.total);
            }
        }
        1 => {
            let m = parse_meminfo(&input.text);
            assert!(m.used <= m.total);
        }
        w => {
            let family = if w == 2 { Family::V4 } else { Family::V6 };
            let l = parse(&input.text, family);
            for x in &l {
                assert_eq!(x.family, family);
                assert_eq!(x.addr.is_ipv4(), family == Family::V4);
            }
            for (_, port) in loopback_only(&l, &input.exclude) {
                assert!(!input.exclude.contains(&port));
            }
        }
    }
}
