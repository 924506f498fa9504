//! `cs ssh` without a command: an interactive login shell on a PTY, driven through tmux as a
//! person would: type, resize, exit, and the laptop terminal is restored afterwards.

use std::process::Command;
use std::time::Duration;

use cs_tests::{cs_bin, wait_until, Laptop};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux")
    }

    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    fn type_line(&self, line: &str) {
        self.cmd(&["send-keys", "-t", "t", "-l", line]);
        self.cmd(&["send-keys", "-t", "t", "Enter"]);
    }

    fn wait_for(&self, what: &str) {
        let seen = wait_until(Duration::from_secs(20), || self.pane().contains(what));
        assert!(seen, "never saw {what:?} in the pane:\n{}", self.pane());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn interactive_shell_types_resizes_exits_and_restores_the_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is required for this test (apt-get install -y tmux)");
    }
    let l = Laptop::new();
    l.sandbox("demo");
    let stty_after = l.dir.path().join("stty-after");
    let script = format!(
        "echo $TERM > {term}; stty -a > {before}; CS_HOME={home} {cs} ssh; echo EXITED:$?; stty -a > {after}; sleep 60",
        term = l.dir.path().join("term").display(),
        before = l.dir.path().join("stty-before").display(),
        home = l.home().display(),
        cs = cs_bin().display(),
        after = stty_after.display(),
    );
    let tmux = Tmux {
        socket: format!("cs-test-{}", std::process::id()),
    };
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let term_file = l.dir.path().join("term");
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&term_file).is_ok_and(|t| !t.is_empty())
    }));
    let term = std::fs::read_to_string(&term_file)
        .unwrap()
        .trim()
        .to_string();
    // TERM is passed to the remote shell.
    tmux.type_line("echo hello-$((40+2)) $TERM");
    tmux.wait_for(&format!("hello-42 {term}"));
    tmux.type_line("stty size");
    tmux.wait_for("30 100");
    tmux.cmd(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    // The new size reaches the remote terminal without any input from the user.
    std::thread::sleep(Duration::from_millis(300));
    tmux.type_line("clear; stty size");
    tmux.wait_for("40 120");
    tmux.type_line("exit 5");
    tmux.wait_for("EXITED:5");
    assert!(wait_until(Duration::from_secs(10), || stty_after.exists()
        && std::fs::metadata(&stty_after).unwrap().len() > 0));
    let before = std::fs::read_to_string(l.dir.path().join("stty-before")).unwrap();
    let after = std::fs::read_to_string(&stty_after).unwrap();
    let modes = |s: &str| -> Vec<String> {
        s.split(|c: char| c.is_whitespace() || c == ';')
            .filter(|w| {
                [
                    "icanon", "-icanon", "echo", "-echo", "isig", "-isig", "opost", "-opost",
                ]
                .contains(w)
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(modes(&after), modes(&before), "terminal not restored");
    assert!(modes(&after).contains(&"icanon".to_string()));
}
