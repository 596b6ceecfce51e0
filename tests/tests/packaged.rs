//! The .deb under a real systemd (tests/systemd/boot): installed with dpkg, secrets delivered the documented
//! ways, tokens through socket activation as root and another uid, reload, watchdog, stop and re-activation,
//! the live security score, the journal, removal and purge; and upgrades that drop no call.

use credbroker_tests::fixture::{SECRET, Setup};
use credbroker_tests::systemd_box::{SystemdBox, deb};

/// The config for the box: client `idp` with a plain credential, client `sealed` with an encrypted one, root
/// may have `scim:*`, nobody `scim:read` (and, with `widen`, `scim:write` too).
fn box_config(s: &Setup, widen: bool) -> String {
    let nobody = if widen {
        "[\"scim:read\", \"scim:write\"]"
    } else {
        "[\"scim:read\"]"
    };
    format!(
        r#"version = 1
[clients.idp]
token_url = "{url}"
allow_http = true
client_id = "broker"
client_secret = {{ credential = "idp" }}

[clients.sealed]
token_url = "{url}"
allow_http = true
client_id = "broker"
client_secret = {{ credential = "sealed" }}

[[policy]]
name = "root"
match = {{ uid = 0 }}
client = ["idp", "sealed"]
scopes = ["scim:*"]

[[policy]]
name = "nobody"
match = {{ user = "nobody" }}
client = "idp"
scopes = {nobody}
"#,
        url = s.idp.token_url()
    )
}

const AS_NOBODY: &str = "setpriv --reuid=65534 --regid=65534 --clear-groups";

/// The config and the secrets, as the README says: a plain credential file, and a `systemd-creds` encrypted
/// one; then the socket started.
async fn configure(sb: &SystemdBox, s: &Setup) {
    let config = sb.put("credbroker.toml", &box_config(s, false));
    let secret = sb.put("idp.secret", &format!("{SECRET}\n"));
    sb.ok(&format!(
        "install -m 0644 {} /etc/credbroker/credbroker.toml && \
         install -m 0600 {} /etc/credbroker/credentials/idp && \
         systemd-creds encrypt --with-key=host --name= {} /etc/credbroker/credentials-encrypted/sealed && \
         systemctl start credbroker.socket",
        config.display(),
        secret.display(),
        secret.display()
    ))
    .await;
}

#[tokio::test]
async fn the_package_installs_serves_reloads_stops_and_leaves_under_systemd() {
    let s = Setup::new().await;
    let sb = SystemdBox::boot().await;
    sb.ok(&format!("dpkg -i {}", sb.stage(&deb(1)).display()))
        .await;
    // Installed: user and directories exist; the socket is enabled but waits for a config.
    sb.ok("getent passwd credbroker").await;
    assert_eq!(
        sb.ok("stat -c '%a %U' /etc/credbroker/credentials /etc/credbroker/credentials-encrypted")
            .await,
        "700 root\n700 root\n"
    );
    assert_eq!(
        sb.property("credbroker.socket", "UnitFileState").await,
        "enabled"
    );
    assert_eq!(
        sb.property("credbroker.socket", "ActiveState").await,
        "inactive"
    );
    let out = sb.sh("credbroker token scim:read").await;
    assert_eq!(
        out.status.code(),
        Some(75),
        "no config yet: the socket is not there"
    );

    // Secrets the documented ways: a plain file, and a systemd-creds encrypted one.
    configure(&sb, &s).await;

    // Socket activation: root, then nobody (allowed, and denied with its exit code).
    let token = sb.ok("credbroker token -c idp scim:read").await;
    assert_eq!(token.trim(), s.idp.issued_tokens()[0]);
    sb.ok("credbroker token -c sealed scim:write").await;
    assert_eq!(
        sb.ok(&format!("{AS_NOBODY} credbroker token scim:read"))
            .await
            .trim(),
        token.trim()
    );
    let denied = sb
        .sh(&format!("{AS_NOBODY} credbroker token scim:write"))
        .await;
    assert_eq!(denied.status.code(), Some(77));
    assert_eq!(
        sb.property("credbroker.service", "ActiveState").await,
        "active"
    );

    // Reload: a widened config applies at once; a broken one is refused and the old one keeps serving.
    let widened = sb.put("widened.toml", &box_config(&s, true));
    sb.ok(&format!(
        "install -m 0644 {} /etc/credbroker/credbroker.toml && systemctl reload credbroker",
        widened.display()
    ))
    .await;
    sb.eventually(&format!("{AS_NOBODY} credbroker token scim:write"))
        .await;
    let broken = sb.put("broken.toml", "version = 1\n[daemon]\nbogus = true\n");
    sb.ok(&format!(
        "install -m 0644 {} /etc/credbroker/credbroker.toml && systemctl reload credbroker",
        broken.display()
    ))
    .await;
    sb.ok(&format!("{AS_NOBODY} credbroker token scim:write"))
        .await;
    sb.eventually("journalctl -u credbroker --no-pager | grep -q 'config reload refused'")
        .await;
    sb.ok(&format!(
        "install -m 0644 {} /etc/credbroker/credbroker.toml",
        widened.display()
    ))
    .await;

    // The watchdog never fires on a healthy daemon: with a 2 s WatchdogSec, 5 s later it runs on, unrestarted.
    sb.ok("mkdir -p /etc/systemd/system/credbroker.service.d && \
           printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/credbroker.service.d/watchdog.conf && \
           systemctl daemon-reload && systemctl restart credbroker && credbroker token -c idp scim:read >/dev/null")
        .await;
    let pid = sb.property("credbroker.service", "MainPID").await;
    sb.ok("sleep 5").await;
    assert_eq!(sb.property("credbroker.service", "MainPID").await, pid);
    assert_eq!(sb.property("credbroker.service", "NRestarts").await, "0");
    assert!(
        !sb.ok("journalctl -u credbroker --no-pager")
            .await
            .contains("Watchdog timeout")
    );

    // stop: a clean exit; the next call activates it again.
    sb.ok("systemctl stop credbroker.service").await;
    assert_eq!(sb.property("credbroker.service", "Result").await, "success");
    assert_eq!(
        sb.property("credbroker.service", "ExecMainStatus").await,
        "0"
    );
    sb.ok("credbroker token -c idp scim:read").await;
    assert_eq!(
        sb.property("credbroker.service", "ActiveState").await,
        "active"
    );

    // The live security score, recorded.
    let security = sb
        .ok("systemd-analyze security --no-pager credbroker.service | tail -1")
        .await;
    println!("live systemd-analyze security: {}", security.trim());
    assert!(security.contains("Overall exposure level"), "{security}");

    // The journal has the audit lines and never the secret or a token.
    let journal = sb.ok("journalctl -u credbroker --no-pager -o cat").await;
    assert!(
        journal.contains("event=\"grant\"") && journal.contains("event=\"deny\""),
        "{journal}"
    );
    assert!(!journal.contains(SECRET), "the secret reached the journal");
    for t in s.idp.issued_tokens() {
        assert!(!journal.contains(&t), "a token reached the journal");
    }

    // Remove: units stopped, socket disabled, binaries gone; purge keeps config, secrets and the user.
    sb.ok("dpkg -r credbroker").await;
    assert_eq!(
        sb.property("credbroker.socket", "ActiveState").await,
        "inactive"
    );
    assert!(sb.sh("test -e /usr/bin/credbrokerd").await.status.code() == Some(1));
    sb.ok("dpkg -P credbroker").await;
    sb.ok("test -f /etc/credbroker/credbroker.toml && test -f /etc/credbroker/credentials/idp && getent passwd credbroker").await;
    assert!(
        sb.sh("test -e /etc/systemd/system/sockets.target.wants/credbroker.socket")
            .await
            .status
            .code()
            == Some(1)
    );
}

#[tokio::test]
async fn reinstalls_and_upgrades_drop_no_call() {
    let s = Setup::new().await;
    let sb = SystemdBox::boot().await;
    sb.ok(&format!("dpkg -i {}", sb.stage(&deb(1)).display()))
        .await;
    configure(&sb, &s).await;
    sb.ok("credbroker token -c idp scim:read").await;
    // A loop of `credbroker token` processes, one call each, until told to stop.
    sb.ok("(while [ ! -e /run/stop-calls ]; do \
              if credbroker token -c idp scim:read >/dev/null 2>>/run/call-errors; then echo ok; else echo fail; fi; \
           done > /run/calls; touch /run/calls-done) >/dev/null 2>&1 &")
        .await;
    sb.ok("while [ \"$(grep -c ok /run/calls 2>/dev/null)\" -lt 20 ]; do sleep 0.05; done")
        .await;
    let before = sb.property("credbroker.service", "MainPID").await;
    sb.ok(&format!("dpkg -i {}", sb.stage(&deb(1)).display()))
        .await;
    let reinstalled = sb.property("credbroker.service", "MainPID").await;
    sb.ok(&format!("dpkg -i {}", sb.stage(&deb(2)).display()))
        .await;
    sb.ok("n=$(grep -c ok /run/calls); while [ \"$(grep -c ok /run/calls)\" -lt $((n + 20)) ]; do sleep 0.05; done").await;
    let upgraded = sb.property("credbroker.service", "MainPID").await;
    sb.ok("touch /run/stop-calls; while [ ! -e /run/calls-done ]; do sleep 0.05; done")
        .await;
    let calls = sb.ok("cat /run/calls").await;
    let errors = sb.ok("cat /run/call-errors").await;
    let (ok, failed) = (calls.matches("ok").count(), calls.matches("fail").count());
    println!("calls across a reinstall and an upgrade: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{failed} calls failed:\n{errors}");
    assert!(ok >= 40, "{ok}");
    assert_ne!(before, reinstalled, "the reinstall restarted the daemon");
    assert_ne!(reinstalled, upgraded, "the upgrade restarted the daemon");
    assert!(
        sb.ok("dpkg-query -W -f '${Version}' credbroker")
            .await
            .ends_with("-2")
    );
}

#[tokio::test]
async fn the_sink_template_keeps_a_consumers_token_file_and_output_to_null_is_fine_under_systemd() {
    let s = Setup::new().await;
    let sb = SystemdBox::boot().await;
    sb.ok(&format!("dpkg -i {}", sb.stage(&deb(1)).display()))
        .await;
    configure(&sb, &s).await;
    // The consumer is nobody: its sink file under /etc/credbroker/sinks, its token file in a directory of its
    // own.
    let sinks = sb.put(
        "nobody.toml",
        "[[sink]]\npath = \"/var/lib/consumer/token\"\nscopes = [\"scim:read\"]\nclient = \"idp\"\nmode = \"0640\"\n",
    );
    sb.ok(&format!(
        "install -d -o nobody -g nogroup -m 0755 /var/lib/consumer && \
         install -m 0644 {} /etc/credbroker/sinks/nobody.toml && \
         systemctl start credbroker-sink@nobody.service && \
         for i in $(seq 300); do [ -s /var/lib/consumer/token ] && break; sleep 0.1; done",
        sinks.display()
    ))
    .await;
    assert_eq!(
        sb.ok("stat -c '%U %a' /var/lib/consumer/token").await,
        "nobody 640\n"
    );
    let file = sb.ok("cat /var/lib/consumer/token").await;
    let direct = sb
        .ok(&format!("{AS_NOBODY} credbroker token -c idp scim:read"))
        .await;
    assert_eq!(file, direct, "the sink holds the token nobody gets");
    assert_eq!(
        sb.property("credbroker-sink@nobody.service", "ActiveState")
            .await,
        "active"
    );
    // The daemon judged the sink as nobody.
    sb.eventually("journalctl -u credbroker --no-pager -o cat | grep -q uid=65534")
        .await;
    // A clean stop.
    sb.ok("systemctl stop credbroker-sink@nobody.service").await;
    assert_eq!(
        sb.property("credbroker-sink@nobody.service", "Result")
            .await,
        "success"
    );

    // A unit whose standard output is /dev/null (opened read-write by systemd) runs `credbroker token` for its
    // exit status: 0, and a denial still 77.
    let ok = sb
        .sh("systemd-run --wait --quiet -p StandardOutput=null -p User=nobody credbroker token -c idp scim:read")
        .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        credbroker_tests::stderr(&ok)
    );
    let denied = sb
        .sh("systemd-run --wait --quiet -p StandardOutput=null -p User=nobody credbroker token -c idp scim:write")
        .await;
    assert_eq!(
        denied.status.code(),
        Some(77),
        "{}",
        credbroker_tests::stderr(&denied)
    );
}

/// Every file under `dir`, as absolute paths below it, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(format!("/{}", p.strip_prefix(base).unwrap().display()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `scripts/install --no-build ARGS --destdir DEST` from the checkout at `root`, which must succeed.
async fn install(root: &std::path::Path, args: &[&str], dest: &std::path::Path) {
    let mut cmd = tokio::process::Command::new(root.join("scripts/install"));
    cmd.arg("--no-build")
        .args(args)
        .arg("--destdir")
        .arg(dest)
        .current_dir(root);
    let out = credbroker_tests::run_cli(cmd, None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        credbroker_tests::stderr(&out)
    );
}

#[tokio::test]
async fn the_source_install_puts_in_place_what_the_package_does_stripped() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stage = tempfile::tempdir().unwrap();
    install(&root, &["--prefix", "/usr"], stage.path()).await;
    // The same files as the .deb, but the Debian-specific copyright and changelog.
    let staged = files_under(stage.path());
    let listing = std::process::Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb(1))
        .output()
        .unwrap();
    let mut packaged: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_owned())
        .filter(|p| !p.ends_with("/copyright") && !p.ends_with("/changelog.Debian.gz"))
        .collect();
    packaged.sort();
    assert_eq!(staged, packaged);
    // The binaries are stripped, as the package's are.
    for b in ["credbrokerd", "credbroker"] {
        let sections = std::process::Command::new("readelf")
            .args(["-S", "--wide"])
            .arg(stage.path().join("usr/bin").join(b))
            .output()
            .unwrap();
        let sections = String::from_utf8_lossy(&sections.stdout);
        assert!(
            !sections.contains(".symtab") && !sections.contains(".debug_"),
            "{b} is not stripped"
        );
    }
    // The units run the installed binaries.
    let unit = std::fs::read_to_string(
        stage
            .path()
            .join("usr/lib/systemd/system/credbroker.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/credbrokerd"), "{unit}");
    // Under /usr/local, they point there.
    let local = tempfile::tempdir().unwrap();
    install(&root, &[], local.path()).await;
    let unit = std::fs::read_to_string(
        local
            .path()
            .join("usr/local/lib/systemd/system/credbroker-sink@.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/credbroker sink"),
        "{unit}"
    );
}
