//! Kernelspecs (`kernel::spec`): `kernel.json` as written in a kernelspec directory,
//! `{connection_file}`/`{resource_dir}` substitution, and the `GUESTD_KERNEL_MAP`
//! language map (`lang=a|b,lang2=c`).

use arbitrary::{Arbitrary, Unstructured};

use guestd::kernel::spec::{KernelSpec, LanguageMap};

#[derive(Arbitrary, Debug)]
struct Input {
    map: String,
    language: String,
    kernel_json: Vec<u8>,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let map = LanguageMap::with_overrides(&input.map);
    let c = map.candidates(&input.language);
    assert!(!c.is_empty(), "no candidates");

    let dir = crate::scratch_dir("kernelspec").join("spec");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("kernel.json"), &input.kernel_json).expect("write");
    match KernelSpec::load(&dir) {
        Ok(spec) => {
            assert!(!spec.argv.is_empty(), "a spec without argv loaded");
            assert_eq!(spec.name, "spec");
            let conn = std::path::Path::new("/run/guestd/kernel-1.json");
            let cl = spec.command_line(conn);
            assert_eq!(cl.len(), spec.argv.len());
            for (a, b) in cl.iter().zip(&spec.argv) {
                if !b.contains('{') {
                    assert_eq!(a, b);
                }
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
