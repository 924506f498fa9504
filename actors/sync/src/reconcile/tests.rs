//! Table tests of reconciliation: each case is three small trees written as text, a mode,
//! and the plan rendered as text. The model-based property test is in
//! `tests/reconcile_model.rs`.

use super::*;
use crate::tree::content_hash;

/// Parses a tree: `-` is a missing root; otherwise space-separated entries after an implied
/// root: `d/` a directory, `f=1` a file with content 1 (`f=1x` executable), `l->t` a symlink.
fn tree(spec: &str) -> Snapshot {
    if spec.trim() == "-" {
        return Snapshot::new();
    }
    let mut s = Snapshot::with_root();
    for item in spec.split_whitespace() {
        let (path, entry) = if let Some(dir) = item.strip_suffix('/') {
            (dir, Entry::Dir)
        } else if let Some((path, target)) = item.split_once("->") {
            (
                path,
                Entry::Symlink {
                    target: target.to_owned(),
                },
            )
        } else {
            let (path, content) = item.split_once('=').expect("f=N");
            let exec = content.ends_with('x');
            let content = content.trim_end_matches('x');
            (
                path,
                Entry::File {
                    size: content.len() as u64,
                    exec,
                    hash: content_hash(content.as_bytes()),
                },
            )
        };
        s.insert(RelPath::parse(path).unwrap(), entry).unwrap();
    }
    s
}

fn render_entry(e: &Entry) -> String {
    match e {
        Entry::Dir => "/".to_owned(),
        Entry::File { exec, hash, .. } => {
            let n = (0..10u8)
                .find(|n| content_hash(n.to_string().as_bytes()) == *hash)
                .map_or("?".to_owned(), |n| n.to_string());
            format!("={n}{}", if *exec { "x" } else { "" })
        }
        Entry::Symlink { target } => format!("->{target}"),
        Entry::Problem { reason } => format!("!{reason}"),
    }
}

fn render(result: &Result<Plan, Halt>) -> String {
    let plan = match result {
        Ok(plan) => plan,
        Err(halt) => return format!("halt {} {:?}", halt.side, halt.reason),
    };
    let mut out = Vec::new();
    for side in [Side::Alpha, Side::Beta] {
        for op in plan.ops(side) {
            out.push(match op {
                Op::Create { path, entry } => format!("{side} +{}{}", path, render_entry(entry)),
                Op::Replace { path, entry, .. } => {
                    format!("{side} ~{}{}", path, render_entry(entry))
                }
                Op::Delete { path, .. } => format!("{side} -{path}"),
            });
        }
    }
    for c in &plan.conflicts {
        out.push(format!("conflict {} {:?}", c.path, c.reason));
    }
    for p in &plan.problems {
        out.push(format!("problem {} {}", p.side, p.path));
    }
    out.join("; ")
}

fn check(ancestor: &str, alpha: &str, beta: &str, mode: Mode, expect: &str) {
    let got = reconcile(&tree(ancestor), &tree(alpha), &tree(beta), mode);
    assert_eq!(
        render(&got),
        expect,
        "ancestor {ancestor:?}, alpha {alpha:?}, beta {beta:?}, {mode:?}"
    );
}

use Mode::*;

#[test]
fn two_way_safe() {
    let m = TwoWaySafe;
    check("", "", "", m, "");
    check("a=1", "a=1", "a=1", m, "");
    // One side changed: it wins.
    check("a=1", "a=2", "a=1", m, "beta ~a=2");
    check("a=1", "a=1", "a=2", m, "alpha ~a=2");
    check("", "d/ d/f=1", "", m, "beta +d/; beta +d/f=1");
    check("d/ d/f=1", "d/ d/f=1", "", m, "alpha -d/f; alpha -d");
    check("a=1", "a=1x", "a=1", m, "beta ~a=1x");
    // Identical changes are never conflicts.
    check("a=1", "a=2", "a=2", m, "");
    check("a=1", "", "", m, "");
    check("", "n/ n/x=3", "n/ n/x=3", m, "");
    // Both edited differently: conflict, both sides untouched.
    check("a=1", "a=2", "a=3", m, "conflict a BothModified");
    check("", "a=2", "a=3", m, "conflict a BothModified");
    check("a=1", "a=1x", "a=2", m, "conflict a BothModified");
    // Deletion against an edit: the edit wins.
    check("a=1 b=1", "b=1", "a=2 b=1", m, "alpha +a=2");
    check("a=1 b=1", "a=2 b=1", "b=1", m, "beta +a=2");
    // A deleted directory whose subtree was edited on the other side comes back whole.
    check(
        "d/ d/f=1 d/g=1 k=1",
        "k=1",
        "d/ d/f=2 d/g=1 k=1",
        m,
        "alpha +d/; alpha +d/f=2; alpha +d/g=1",
    );
    check(
        "d/ d/f=1 k=1",
        "d/ d/f=1 d/new=5 k=1",
        "k=1",
        m,
        "beta +d/; beta +d/f=1; beta +d/new=5",
    );
    // Both only deleted: the fuller deletion wins.
    check(
        "d/ d/f=1 d/g=1 k=1",
        "k=1",
        "d/ d/g=1 k=1",
        m,
        "beta -d/g; beta -d",
    );
    // Type changes.
    check(
        "a=1",
        "a/ a/x=1",
        "a=1",
        m,
        "beta -a; beta +a/; beta +a/x=1",
    );
    check(
        "d/ d/x=1",
        "d=4",
        "d/ d/x=1",
        m,
        "beta -d/x; beta -d; beta +d=4",
    );
    check("a=1", "a->b", "a=1", m, "beta ~a->b");
    check("a=1", "a/", "a=2", m, "conflict a BothModified");
    check("d/ d/x=1", "d=4", "d/ d/x=2", m, "conflict d BothModified");
    // Unrelated edits under an agreed directory both propagate.
    check(
        "d/ d/a=1 d/b=1",
        "d/ d/a=2 d/b=1",
        "d/ d/a=1 d/b=2",
        m,
        "alpha ~d/b=2; beta ~d/a=2",
    );
}

#[test]
fn two_way_resolved_alpha_wins() {
    let m = TwoWayResolved;
    check("a=1", "a=2", "a=3", m, "beta ~a=2");
    check(
        "d/ d/x=1",
        "d=4",
        "d/ d/x=2",
        m,
        "beta -d/x; beta -d; beta +d=4",
    );
    // Deletion against an edit still lets the edit win (Mutagen's behaviour).
    check("a=1 b=1", "b=1", "a=2 b=1", m, "alpha +a=2");
    check("a=1", "a=1", "a=2", m, "alpha ~a=2");
}

#[test]
fn one_way_safe() {
    let m = OneWaySafe;
    check("a=1", "a=2", "a=1", m, "beta ~a=2");
    // Beta deletions are restored.
    check("a=1 b=1", "a=1 b=1", "b=1", m, "beta +a=1");
    // Beta edits are never overwritten, nor propagated to alpha.
    check("a=1", "a=2", "a=3", m, "conflict a BetaModified");
    check("a=1", "a=1", "a=3", m, "conflict a BetaModified");
    // Beta-only creations stay on beta, untracked.
    check("", "", "new=1", m, "");
    // Alpha deleted what beta edited: beta keeps its version.
    check("a=1 b=1", "b=1", "a=2 b=1", m, "");
    check("a=1 b=1", "b=1", "a=1 b=1", m, "beta -a");
    check("d/ d/x=1", "", "d/ d/x=2", m, "conflict d BetaModified");
}

#[test]
fn one_way_replica() {
    let m = OneWayReplica;
    check("a=1", "a=1", "a=3 b=4", m, "beta ~a=1; beta -b");
    check("", "d/ d/x=1", "d=2", m, "beta -d; beta +d/; beta +d/x=1");
    // An emptied beta is refilled, not a halt.
    check("a=1 b=1", "a=1 b=1", "", m, "beta +a=1; beta +b=1");
    check(
        "a=1 b=1",
        "a=1 b=1",
        "-",
        m,
        "beta +<root>/; beta +a=1; beta +b=1",
    );
}

#[test]
fn halts() {
    check(
        "a=1 b=1",
        "",
        "a=1 b=1",
        TwoWaySafe,
        "halt alpha RootEmptied { ancestor_top_level: 2 }",
    );
    check(
        "a=1 b=1",
        "a=1 b=1",
        "",
        TwoWaySafe,
        "halt beta RootEmptied { ancestor_top_level: 2 }",
    );
    check(
        "a=1 b=1",
        "-",
        "a=1 b=1",
        TwoWayResolved,
        "halt alpha RootDeleted",
    );
    check(
        "a=1 b=1",
        "",
        "a=1 b=1",
        OneWayReplica,
        "halt alpha RootEmptied { ancestor_top_level: 2 }",
    );
    check("", "-", "a=1", OneWayReplica, "halt alpha RootDeleted");
    // No ancestor, but the plan itself would delete beta's root.
    check("-", "-", "a=1", OneWayReplica, "halt alpha RootDeleted");
    // One top-level entry: deleting it is an ordinary edit.
    check("a=1", "", "a=1", TwoWaySafe, "beta -a");
    // Both emptied: nothing would propagate.
    check("a=1 b=1", "", "", TwoWaySafe, "");
    // A fresh session with an empty side just copies.
    check("-", "a=1", "-", TwoWaySafe, "beta +<root>/; beta +a=1");
}

#[test]
fn non_portable_symlinks_are_problems() {
    let m = TwoWaySafe;
    check("", "l->/etc", "", m, "problem alpha l");
    check("", "d/ d/l->../..", "", m, "beta +d/; problem alpha d/l");
    // Never overwritten or deleted: that would lose content sync cannot restore.
    check("", "l=1", "l->/etc", m, "problem beta l");
    check(
        "d/ d/f=1 k=1",
        "k=1",
        "d/ d/f=1 d/l->/x k=1",
        m,
        "conflict d Unsynchronizable(Beta); problem beta d/l",
    );
    check("", "ok->k k=1", "", m, "beta +k=1; beta +ok->k");
}

#[test]
fn scan_problems_are_never_deletions() {
    let with_problem = |spec: &str, path: &str| {
        let mut t = tree(spec);
        t.insert(
            RelPath::parse(path).unwrap(),
            Entry::Problem {
                reason: "unreadable".into(),
            },
        )
        .unwrap();
        t
    };
    // Beta's file became unreadable: not a deletion, nothing moves.
    let got = reconcile(
        &tree("a=1 b=1"),
        &tree("a=1 b=1"),
        &with_problem("b=1", "a"),
        TwoWaySafe,
    );
    assert_eq!(render(&got), "problem beta a");
    // Alpha deleted a directory holding beta's unreadable file: a conflict, not a delete.
    let got = reconcile(
        &tree("d/ k=1"),
        &tree("k=1"),
        &with_problem("d/ k=1", "d/x"),
        TwoWaySafe,
    );
    assert_eq!(
        render(&got),
        "conflict d Unsynchronizable(Beta); problem beta d/x"
    );
}

#[test]
fn ancestor_after_records_agreement_and_applied_ops() {
    let ancestor = tree("a=1 b=1 s=1");
    let alpha = tree("a=2 b=1 n/ n/x=1 s=7");
    let beta = tree("a=1 n/ n/x=1 s=8");
    let plan = reconcile(&ancestor, &alpha, &beta, TwoWaySafe).unwrap();
    assert_eq!(
        render(&Ok(plan.clone())),
        "alpha -b; beta ~a=2; conflict s BothModified"
    );

    let all = ancestor_after(&ancestor, &plan, &plan.all_applied());
    assert_eq!(all, tree("a=2 n/ n/x=1 s=1"));

    // A failed op leaves its path as it was: the next cycle retries it.
    let partial = Applied {
        to_alpha: vec![false],
        to_beta: vec![true],
    };
    let next = ancestor_after(&ancestor, &plan, &partial);
    assert_eq!(next, tree("a=2 b=1 n/ n/x=1 s=1"));
    let mut alpha2 = alpha.clone();
    let mut beta2 = beta.clone();
    apply_to_snapshot(&mut beta2, &plan.to_beta[0]).unwrap();
    let again = reconcile(&next, &alpha2, &beta2, TwoWaySafe).unwrap();
    assert_eq!(
        render(&Ok(again.clone())),
        "alpha -b; conflict s BothModified"
    );
    apply_to_snapshot(&mut alpha2, &again.to_alpha[0]).unwrap();
    let last = ancestor_after(&next, &again, &again.all_applied());
    let done = reconcile(&last, &alpha2, &beta2, TwoWaySafe).unwrap();
    assert!(done.is_empty(), "{done:?}");
}

#[test]
fn apply_to_snapshot_rechecks() {
    let mut t = tree("a=1 d/ d/x=1");
    let e = |s: &str| tree(s).get(&RelPath::parse("a").unwrap()).cloned().unwrap();
    let a = RelPath::parse("a").unwrap();
    let d = RelPath::parse("d").unwrap();
    let stale = Op::Replace {
        path: a.clone(),
        expected: e("a=2"),
        entry: e("a=3"),
    };
    assert_eq!(
        apply_to_snapshot(&mut t, &stale),
        Err(OpError::Changed { path: a.clone() })
    );
    let create = Op::Create {
        path: a.clone(),
        entry: e("a=3"),
    };
    assert!(matches!(
        apply_to_snapshot(&mut t, &create),
        Err(OpError::Exists { .. })
    ));
    let rmdir = Op::Delete {
        path: d.clone(),
        expected: Entry::Dir,
    };
    assert_eq!(
        apply_to_snapshot(&mut t, &rmdir),
        Err(OpError::NotEmpty { path: d })
    );
}

#[test]
fn an_intent_settles_by_what_the_side_holds() {
    let f = |n: u8| Entry::File {
        size: 1,
        exec: false,
        hash: content_hash(&[n]),
    };
    let path = RelPath::parse("a/b").unwrap();
    let op = Op::Replace {
        path: path.clone(),
        expected: f(1),
        entry: f(2),
    };
    let i = Intent::of(&op).expect("a file op has an intent");
    // Applied, not applied, changed since by someone else, deleted since.
    assert_eq!(i.settle(Some(&f(2))), (path.clone(), Some(f(2))));
    assert_eq!(i.settle(Some(&f(1))), (path.clone(), Some(f(1))));
    assert_eq!(i.settle(Some(&f(3))), (path.clone(), None));
    assert_eq!(i.settle(None), (path.clone(), None));
    // A create that did not happen leaves nothing; directories have no intents.
    let create = Intent::of(&Op::Create {
        path: path.clone(),
        entry: f(5),
    })
    .unwrap();
    assert_eq!(create.settle(None), (path.clone(), None));
    assert!(Intent::of(&Op::Create {
        path: path.clone(),
        entry: Entry::Dir
    })
    .is_none());
}
