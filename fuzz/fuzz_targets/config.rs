//! The config file, from TOML text to a validated `Config` or every error, with every secret source read
//! through `SecretEnv::offline` (no file, directory or variable is touched).
//!
//! Properties: validation is deterministic (twice the same outcome, the same summary or the same errors);
//! neither the summary nor any error shows a secret's value; and a config that validates validates again
//! after a round trip through its summary (which `check-config` prints as TOML), to the same summary.
#![no_main]

use credbroker_daemon::config::Config;
use credbroker_daemon::secret::SecretEnv;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-value-5f3a";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let offline = |_: &credbroker_daemon::secret::SecretSource| Some(SECRET.to_owned());
    let env = SecretEnv {
        credentials_dir: None,
        var: &|_| None,
        offline: Some(&offline),
    };
    let (a, b) = (Config::parse(text, &env), Config::parse(text, &env));
    match (&a, &b) {
        (Ok(x), Ok(y)) => {
            let summary = x.summary();
            assert_eq!(summary, y.summary(), "the same config twice");
            assert!(!summary.contains(SECRET), "a secret in the summary");
            assert!(!format!("{x:?}").contains(SECRET), "a secret in Debug");
            match Config::parse(&summary, &env) {
                Ok(again) => assert_eq!(again.summary(), summary, "the summary's summary differs"),
                Err(e) => panic!("the summary does not validate: {e}\n{summary}"),
            }
        }
        (Err(x), Err(y)) => {
            assert_eq!(x, y, "the same errors twice");
            assert!(!x.to_string().contains(SECRET), "a secret in an error");
        }
        _ => panic!("validation is not deterministic"),
    }
});
