//! Audit-line escaping: what a caller sends (scopes, a client name) or names its process (an executable path,
//! a unit) reaches a log line or a message only escaped and bounded.
//!
//! Properties: an escaped value holds no raw control character and stays within its bound; a caller's
//! description is one line.
#![no_main]

use credbroker_daemon::identity::peer::Caller;
use credbroker_daemon::text::{SHOWN, clip_escaped, cut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let shown = clip_escaped(&text).to_string();
    assert!(
        !shown.chars().any(char::is_control),
        "a raw control character: {shown:?}"
    );
    // The escaped prefix, then at most "… (N bytes)".
    assert!(
        shown.chars().count() <= SHOWN + 32,
        "{} characters",
        shown.chars().count()
    );
    let cut = cut(&text, 600);
    assert!(cut.len() <= 600 + 32);
    let caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 42,
        user: Some("alice".into()),
        gids: vec![1000],
        groups: vec!["alice".into()],
        exe: Some(std::path::PathBuf::from(text.as_ref())),
        exe_id: None,
        exe_note: None,
        unit: Some(text.to_string()),
    };
    let line = caller.to_string();
    assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
    assert!(
        line.len() < 2 * (SHOWN * 4 + 64) + 128,
        "{} bytes",
        line.len()
    );
});
