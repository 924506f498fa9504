//! A checkout as a shell script for git: what the agent runs (and logs) for a checkout step,
//! and for Auto Mode's update.
//!
//! The clone goes into a temporary directory beside the destination and is renamed into place
//! only when it is whole, so an agent killed in the middle leaves no half checkout for the
//! next start to mistake for a finished one (it starts again from scratch).
//!
//! `version_spec` is tried as a branch or tag first (`git clone --branch`); a spec that is no
//! ref of the remote and looks like a commit (7 to 40 hex digits) is fetched by id, with the
//! same depth or date limit, and checked out detached. Submodules are cloned recursively
//! unless `disable_recursive_checkout`. For a repository given as a local path or `file://`
//! URL (a local sandbox, a test), its submodules may be local too, which git refuses by default
//! since 2.38 (`protocol.file.allow`): those clones allow the file protocol.

use crate::definition::Checkout;

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether a version spec could be a commit id.
pub fn looks_like_commit(spec: &str) -> bool {
    (7..=40).contains(&spec.len()) && spec.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether git would treat `url` as a repository on this machine.
pub fn is_local(url: &str) -> bool {
    url.starts_with('/') || url.starts_with("file://") || url.starts_with("./")
}

/// The script that checks `c` out into `dest` (absolute), through `tmp` (a sibling of it).
pub fn clone_script(c: &Checkout, dest: &str, tmp: &str) -> String {
    let url = c.repo.url();
    let git = if is_local(&url) {
        "git -c protocol.file.allow=always"
    } else {
        "git"
    };
    let mut limits = String::new();
    if let Some(h) = &c.history {
        if let Some(d) = h.depth {
            limits.push_str(&format!(" --depth {d}"));
        }
        if let Some(s) = &h.since {
            limits.push_str(&format!(" --shallow-since={}", quote(s)));
        }
    }
    let shallow = !limits.is_empty();
    // git ignores --depth and --shallow-since for a clone from a plain path; the same
    // repository as a file:// URL honours them.
    let url = if shallow && url.starts_with('/') {
        format!("file://{url}")
    } else {
        url
    };
    let recurse = if c.disable_recursive_checkout {
        " --no-recurse-submodules"
    } else if shallow {
        " --recurse-submodules --shallow-submodules"
    } else {
        " --recurse-submodules"
    };
    let (q_url, q_tmp, q_dest) = (quote(&url), quote(tmp), quote(dest));
    let spec_shown = c.version_spec.as_deref().unwrap_or("the default branch");
    let mut s = format!("# clone {url} ({spec_shown}) into {dest}\nset -eu\n");
    s.push_str(&format!(
        "rm -rf {q_tmp}\nmkdir -p \"$(dirname {q_tmp})\"\n"
    ));
    match c.version_spec.as_deref() {
        None => s.push_str(&format!(
            "{git} clone --progress{limits}{recurse} -- {q_url} {q_tmp}\n"
        )),
        Some(spec) => {
            let q_spec = quote(spec);
            let by_ref = format!(
                "{git} clone --progress{limits}{recurse} --branch {q_spec} -- {q_url} {q_tmp}\n"
            );
            if looks_like_commit(spec) {
                let submodules = if c.disable_recursive_checkout {
                    String::new()
                } else {
                    format!("{git} -C {q_tmp} submodule update --init --recursive\n")
                };
                s.push_str(&format!(
                    "if git ls-remote --exit-code {q_url} {q_spec} >/dev/null 2>&1; then\n{by_ref}else\n\
                     echo \"{spec} is no branch or tag of the remote: fetching it as a commit\"\n\
                     git init -q {q_tmp}\n\
                     git -C {q_tmp} remote add origin {q_url}\n\
                     if ! git -C {q_tmp} fetch --progress{limits} origin {q_spec}; then\n\
                     echo \"fetching {spec} by id failed: fetching all branches\"\n\
                     git -C {q_tmp} fetch --progress{limits} origin '+refs/heads/*:refs/remotes/origin/*'\n\
                     git -C {q_tmp} checkout -q --detach {q_spec}\n\
                     else\n\
                     git -C {q_tmp} checkout -q --detach FETCH_HEAD\n\
                     fi\n{submodules}fi\n"
                ));
            } else {
                s.push_str(&by_ref);
            }
        }
    }
    s.push_str(&format!(
        "mv {q_tmp} {q_dest}\necho \"checked out $(git -C {q_dest} rev-parse HEAD) into {q_dest}\"\n"
    ));
    s
}

/// Auto Mode's update of a checkout at `dest` on `branch`: discard local changes, then move
/// to the remote's commit (submodules too unless disabled).
pub fn update_script(c: &Checkout, dest: &str, branch: &str) -> String {
    let url = c.repo.url();
    let git = if is_local(&url) {
        "git -c protocol.file.allow=always"
    } else {
        "git"
    };
    let (q_dest, q_branch) = (quote(dest), quote(branch));
    let mut s = format!(
        "set -eu\ncd {q_dest}\n\
         echo \"discarding local changes\"\n\
         git reset -q --hard\ngit clean -qfd\n\
         git fetch --progress origin {q_branch}\n\
         git checkout -q -B {q_branch} FETCH_HEAD\n"
    );
    if !c.disable_recursive_checkout {
        s.push_str(&format!("{git} submodule update --init --recursive\n"));
    }
    s.push_str("echo \"updated to $(git rev-parse HEAD)\"\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Definition;

    fn checkout(extra: &str) -> Checkout {
        let text = format!(
            "workspaces:\n- name: w\n  checkouts:\n  - path: src/app\n    repo:\n      git: /srv/app.git\n{extra}"
        );
        Definition::parse(&text).unwrap().workspaces[0].checkouts[0].clone()
    }

    #[test]
    fn quoting_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(quote("main"), "main");
        assert_eq!(quote("/a b"), "'/a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn commits_are_seven_to_forty_hex_digits() {
        assert!(looks_like_commit("deadbee"));
        assert!(looks_like_commit(&"a".repeat(40)));
        assert!(!looks_like_commit("main"));
        assert!(!looks_like_commit("abc123"));
        assert!(!looks_like_commit(&"a".repeat(41)));
    }

    #[test]
    fn the_first_line_says_what_is_cloned_where() {
        let s = clone_script(&checkout("    version_spec: next\n"), "/h/a", "/h/.a.tmp");
        assert_eq!(
            s.lines().next(),
            Some("# clone /srv/app.git (next) into /h/a")
        );
    }

    #[test]
    fn a_branch_with_depth_clones_shallow_with_submodules() {
        let s = clone_script(
            &checkout("    version_spec: next\n    history:\n      depth: 1\n"),
            "/h/src/app",
            "/h/src/.app.cs-checkout",
        );
        assert!(s.contains("clone --progress --depth 1 --recurse-submodules --shallow-submodules --branch next -- file:///srv/app.git /h/src/.app.cs-checkout"), "{s}");
        assert!(s.contains("protocol.file.allow=always"), "{s}");
        assert!(s.contains("mv /h/src/.app.cs-checkout /h/src/app"), "{s}");
        assert!(!s.contains("ls-remote"), "{s}");
    }

    #[test]
    fn a_commit_is_tried_as_a_ref_then_fetched_by_id() {
        let s = clone_script(
            &checkout("    version_spec: 0123abc\n    disable_recursive_checkout: true\n"),
            "/h/a",
            "/h/.a.tmp",
        );
        assert!(
            s.contains("ls-remote --exit-code /srv/app.git 0123abc"),
            "{s}"
        );
        assert!(s.contains("fetch --progress origin 0123abc"), "{s}");
        assert!(s.contains("checkout -q --detach FETCH_HEAD"), "{s}");
        assert!(s.contains("--no-recurse-submodules"), "{s}");
        assert!(!s.contains("submodule update"), "{s}");
    }

    #[test]
    fn since_is_passed_quoted_and_remote_urls_keep_the_file_protocol_off() {
        let text = "workspaces:\n- name: w\n  checkouts:\n  - path: a\n    repo:\n      github: {org: o, repo: r}\n    history:\n      since: 2025-10-12 00:00\n";
        let c = Definition::parse(text).unwrap().workspaces[0].checkouts[0].clone();
        let s = clone_script(&c, "/h/a", "/h/.a.tmp");
        assert!(s.contains("--shallow-since='2025-10-12 00:00'"), "{s}");
        assert!(s.contains("https://github.com/o/r"), "{s}");
        assert!(!s.contains("protocol.file.allow"), "{s}");
    }

    #[test]
    fn the_update_discards_local_changes_first() {
        let s = update_script(&checkout(""), "/h/src/app", "main");
        let reset = s.find("reset -q --hard").unwrap();
        let fetch = s.find("fetch --progress origin main").unwrap();
        assert!(reset < fetch, "{s}");
        assert!(s.contains("submodule update --init --recursive"), "{s}");
    }
}
