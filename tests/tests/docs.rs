//! The documentation holds true: every relative link and anchor of the README and `docs/` resolves; every
//! command block marked `<!-- runnable -->` runs, as written, against a live daemon set up as the quick start
//! sets it up; the example config validates; and the hints it and the errors give match the shipped unit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use credbroker_tests::idp::{Registration, StandInIdp};
use credbroker_tests::{Daemon, TestDir, bin, run_cli, stderr, stdout};
use tokio::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README and every page of `docs/`.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fence = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fence = !fence;
                return false;
            }
            !fence
        })
        .collect()
}

/// GitHub's anchor for a heading: lowercase, punctuation but `-` and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings (repeated headings get `-1`, `-2`…).
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let base = slug(heading.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    seen
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut links = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for line in prose(&text) {
            for (i, _) in line.match_indices("](") {
                let rest = &line[i + 2..];
                let Some(end) = rest.find(')') else { continue };
                let target = &rest[..end];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                links += 1;
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let file = if path.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(path)
                };
                let shown = format!("{}: {target}", page.strip_prefix(root()).unwrap().display());
                let Ok(content) = std::fs::read_to_string(&file) else {
                    if !file.exists() {
                        broken.push(format!("{shown} (no such file)"));
                    }
                    continue;
                };
                if !anchor.is_empty() && !anchors(&content).contains(anchor) {
                    broken.push(format!("{shown} (no such heading)"));
                }
            }
        }
    }
    assert!(links > 30, "only {links} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_a_front_door() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 250, "the README has {lines} lines");
    let headings: Vec<&str> = prose(&readme)
        .into_iter()
        .filter(|l| l.starts_with("## "))
        .collect();
    for wanted in [
        "## Requirements",
        "## Quick start",
        "## Install",
        "## A minimal config",
        "## First token",
        "## Where to read more",
    ] {
        assert!(headings.contains(&wanted), "{wanted} missing: {headings:?}");
    }
}

/// Every command block marked runnable in the README and `docs/`: (page, block).
fn runnable_blocks() -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.trim() != "<!-- runnable -->" {
                continue;
            }
            let fence = lines.next().unwrap_or("");
            assert!(
                fence.starts_with("```sh"),
                "{}: a runnable mark before {fence:?}",
                page.display()
            );
            let block: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((
                page.strip_prefix(root()).unwrap().display().to_string(),
                block.join("\n"),
            ));
        }
    }
    blocks
}

#[tokio::test]
async fn every_runnable_command_block_runs_against_a_live_daemon() {
    // As the quick start sets it up: the stand-in with its demo client, a policy for the user running it.
    let dir = TestDir::new();
    let secret = dir.write("demo.secret", "quickstart-secret\n", 0o600);
    let idp = StandInIdp::start(
        0,
        vec![Registration {
            id: "credbroker-demo".into(),
            secret: "quickstart-secret".into(),
            scopes: ["scim:read", "scim:write", "internal_user_mgt_view"]
                .map(str::to_owned)
                .to_vec(),
        }],
    )
    .await;
    let config = format!(
        "version = 1\n\n[daemon]\nsocket = \"{socket}\"\n\n[clients.demo]\ntoken_url = \"{url}\"\n\
         client_id = \"credbroker-demo\"\nallow_http = true\nclient_secret = {{ file = \"{secret}\" }}\n\n\
         [[policy]]\nname = \"quickstart\"\nmatch = {{ user = \"root\" }}\nclient = \"demo\"\n\
         scopes = [\"scim:read\", \"internal_user_mgt_*\"]\n",
        socket = dir.path().join("credbroker.sock").display(),
        url = idp.token_url(),
        secret = secret.display(),
    );
    let d = Daemon::start(&dir, &config).await;
    let blocks = runnable_blocks();
    assert!(blocks.len() >= 2, "{blocks:?}");
    let path = format!(
        "{}:{}",
        bin("credbroker").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (page, block) in blocks {
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", &block])
            .current_dir(root())
            .env("CREDBROKER_SOCKET", &d.socket)
            .env("PATH", &path)
            .env_remove("CREDBROKER_PROTO")
            .env_remove("NODE_PATH");
        let out = run_cli(cmd, None).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{page}:\n{block}\n---\n{}{}",
            stdout(&out),
            stderr(&out)
        );
        // Every token printed is one the IdP issued.
        for word in stdout(&out).split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if word.len() == 36 && word.matches('-').count() == 4 {
                assert!(
                    idp.is_valid(word),
                    "{page}: {word} is not a token the IdP issued"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_example_config_validates_and_its_hints_match_the_shipped_unit() {
    let dir = TestDir::new();
    // As the shipped unit hands it over: /etc/credbroker/credentials/asgardeo as credential credbroker_asgardeo.
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    dir.write("credentials/credbroker_asgardeo", "s3cret\n", 0o600);
    let example = root().join("systemd/credbroker.toml");
    let mut cmd = Command::new(bin("credbrokerd"));
    cmd.args(["check-config", "--config"])
        .arg(&example)
        .env("CREDENTIALS_DIRECTORY", &creds);
    let out = run_cli(cmd, None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // Its comments name the unit's credential directory and the mode a file the daemon reads itself needs.
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(text.contains("/etc/credbroker/credentials/"), "{text}");
    assert!(text.contains("root:credbroker, mode 0640"), "{text}");
    let unit = std::fs::read_to_string(root().join("systemd/credbroker.service")).unwrap();
    assert!(unit.contains("LoadCredential=credbroker:/etc/credbroker/credentials"));
    assert!(unit.contains("User=credbroker"));
    // Outside systemd, the error says where the unit looks, not an unit line the user has to write.
    let mut cmd = Command::new(bin("credbrokerd"));
    cmd.args(["check-config", "--config"])
        .arg(&example)
        .env_remove("CREDENTIALS_DIRECTORY");
    let out = run_cli(cmd, None).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("/etc/credbroker/credentials/asgardeo"),
        "{}",
        stderr(&out)
    );
}
