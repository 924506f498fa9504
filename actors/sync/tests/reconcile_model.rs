//! Property tests of reconciliation against a reference model: a tree is a `Snapshot` used as
//! an in-memory filesystem, both sides start from a random ancestor, each side gets its own
//! random edits, the plan is applied with `apply_to_snapshot` (the same re-checks as the real
//! shell) and the result is checked against what each mode promises.

use std::collections::BTreeSet;

use proptest::prelude::*;

use cs_sync::{
    ancestor_after, apply_to_snapshot, content_hash, reconcile, reconcile_dirty, Entry, Mode, Plan,
    RelPath, Snapshot,
};

#[derive(Clone, Debug)]
enum EditKind {
    /// Create or overwrite a file (creating missing parent directories).
    Write { content: u8, exec: bool },
    /// Delete the path and everything below it.
    Delete,
    /// Create a directory (and missing parents).
    Mkdir,
    /// File or symlink becomes a directory, a directory becomes a file.
    TypeChange { content: u8 },
    /// Flip the executable bit of a file.
    ToggleExec,
    /// Create or overwrite a symlink (always portable: it points at a sibling name).
    Symlink { target: u8 },
    /// Something sync cannot carry: an absolute symlink, or what a scan reports as a problem
    /// (only in the tests that expect problems).
    Unsyncable { symlink: bool },
}

#[derive(Clone, Debug)]
struct Edit {
    path: Vec<u8>,
    kind: EditKind,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn file(content: u8, exec: bool) -> Entry {
    Entry::File {
        size: 1,
        exec,
        hash: content_hash(&[content]),
    }
}

fn rel(path: &[u8]) -> RelPath {
    let s: Vec<&str> = path.iter().map(|&i| NAMES[i as usize]).collect();
    RelPath::parse(&s.join("/")).expect("valid test path")
}

/// Creates the missing parents of `path` as directories; false if a parent is not a
/// directory (the edit is then skipped, as a user's `mkdir -p` would fail).
fn mkdir_parents(tree: &mut Snapshot, path: &RelPath) -> bool {
    for parent in path.ancestors() {
        match tree.get(&parent) {
            Some(Entry::Dir) => {}
            Some(_) => return false,
            None => {
                if tree.insert(parent, Entry::Dir).is_err() {
                    return false;
                }
            }
        }
    }
    true
}

fn apply_edit(tree: &mut Snapshot, edit: &Edit) {
    let path = rel(&edit.path);
    match &edit.kind {
        EditKind::Write { content, exec } => {
            if mkdir_parents(tree, &path) {
                tree.insert(path, file(*content, *exec))
                    .expect("parents exist");
            }
        }
        EditKind::Delete => {
            tree.remove(&path);
        }
        EditKind::Mkdir => {
            if mkdir_parents(tree, &path) && tree.get(&path).is_none() {
                tree.insert(path, Entry::Dir).expect("parents exist");
            }
        }
        EditKind::TypeChange { content } => match tree.get(&path) {
            Some(Entry::Dir) => {
                tree.insert(path, file(*content, false))
                    .expect("parents exist");
            }
            Some(_) => {
                tree.remove(&path);
                tree.insert(path, Entry::Dir).expect("parents exist");
            }
            None => {}
        },
        EditKind::ToggleExec => {
            if let Some(Entry::File { size, exec, hash }) = tree.get(&path).cloned() {
                let flipped = Entry::File {
                    size,
                    exec: !exec,
                    hash,
                };
                tree.insert(path, flipped).expect("exists");
            }
        }
        EditKind::Symlink { target } => {
            if mkdir_parents(tree, &path) {
                let target = NAMES[*target as usize].to_owned();
                tree.insert(path, Entry::Symlink { target })
                    .expect("parents exist");
            }
        }
        EditKind::Unsyncable { symlink } => {
            if mkdir_parents(tree, &path) {
                tree.take_subtree(&path);
                let entry = if *symlink {
                    Entry::Symlink {
                        target: "/etc/passwd".into(),
                    }
                } else {
                    Entry::Problem {
                        reason: "a socket".into(),
                    }
                };
                tree.insert(path, entry).expect("parents exist");
            }
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    let kind = prop_oneof![
        4 => (0u8..4, any::<bool>()).prop_map(|(content, exec)| EditKind::Write { content, exec }),
        2 => Just(EditKind::Delete),
        2 => Just(EditKind::Mkdir),
        1 => (0u8..4).prop_map(|content| EditKind::TypeChange { content }),
        1 => Just(EditKind::ToggleExec),
        1 => (0u8..3).prop_map(|target| EditKind::Symlink { target }),
    ];
    (prop::collection::vec(0u8..3, 1..=3), kind).prop_map(|(path, kind)| Edit { path, kind })
}

/// [`edit`], now and then making something sync cannot carry.
fn edit_or_problem() -> impl Strategy<Value = Edit> {
    prop_oneof![
        9 => edit(),
        1 => (prop::collection::vec(0u8..3, 1..=3), any::<bool>())
            .prop_map(|(path, symlink)| Edit { path, kind: EditKind::Unsyncable { symlink } }),
    ]
}

/// Every path at which the three trees do not hold the same entry, or a side holds a
/// problem: what a session must mark dirty.
fn differing(ancestor: &Snapshot, alpha: &Snapshot, beta: &Snapshot) -> BTreeSet<RelPath> {
    let mut all: Vec<&RelPath> = ancestor
        .iter()
        .chain(alpha.iter())
        .chain(beta.iter())
        .map(|(p, _)| p)
        .collect();
    all.sort();
    all.dedup();
    all.into_iter()
        .filter(|p| {
            let (a, b) = (alpha.get(p), beta.get(p));
            let problem = |e: Option<&Entry>| match e {
                Some(Entry::Problem { .. }) => true,
                Some(Entry::Symlink { target }) => target.starts_with('/'),
                _ => false,
            };
            ancestor.get(p) != a || a != b || problem(a) || problem(b)
        })
        .cloned()
        .collect()
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 0..10)
}

fn build(base: &Snapshot, edits: &[Edit]) -> Snapshot {
    let mut t = base.clone();
    for e in edits {
        apply_edit(&mut t, e);
    }
    t
}

/// Applies every op of `plan`; every op must pass its re-check (the model is exact).
fn apply_plan(alpha: &Snapshot, beta: &Snapshot, plan: &Plan) -> (Snapshot, Snapshot) {
    let mut a = alpha.clone();
    let mut b = beta.clone();
    for op in &plan.to_alpha {
        apply_to_snapshot(&mut a, op).unwrap_or_else(|e| panic!("alpha {op:?}: {e}"));
    }
    for op in &plan.to_beta {
        apply_to_snapshot(&mut b, op).unwrap_or_else(|e| panic!("beta {op:?}: {e}"));
    }
    (a, b)
}

fn in_conflict(plan: &Plan, path: &RelPath) -> bool {
    plan.conflicts.iter().any(|c| path.starts_with(&c.path))
}

fn paths(a: &Snapshot, b: &Snapshot) -> Vec<RelPath> {
    let mut v: Vec<RelPath> = a.iter().chain(b.iter()).map(|(p, _)| p.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// Runs one cycle and checks the promises of `mode`; returns false if sync halted.
fn check_cycle(ancestor: &Snapshot, alpha: &Snapshot, beta: &Snapshot, mode: Mode) -> bool {
    let plan = match reconcile(ancestor, alpha, beta, mode) {
        Ok(plan) => plan,
        Err(halt) => {
            let wiped = match halt.side {
                cs_sync::Side::Alpha => alpha,
                cs_sync::Side::Beta => beta,
            };
            assert!(
                wiped.top_level_count() == 0,
                "halt {halt} but the side has content"
            );
            return false;
        }
    };
    assert!(plan.problems.is_empty(), "portable symlinks only: {plan:?}");
    let (a2, b2) = apply_plan(alpha, beta, &plan);
    let ancestor2 = ancestor_after(ancestor, &plan, &plan.all_applied());

    match mode {
        Mode::TwoWaySafe => {
            // (b) Everything outside conflicts converges.
            for p in paths(&a2, &b2) {
                if !in_conflict(&plan, &p) {
                    assert_eq!(a2.get(&p), b2.get(&p), "{p} did not converge");
                }
            }
            // (a) Nothing written by a user is lost: each created or edited entry is still
            // on its own side (so also on the other, unless in a conflict, which left both
            // sides untouched).
            for (before, after) in [(alpha, &a2), (beta, &b2)] {
                for (p, e) in before.iter() {
                    if ancestor.get(p) != Some(e) {
                        assert_eq!(after.get(p), Some(e), "edit at {p} lost");
                    }
                }
            }
            for c in &plan.conflicts {
                assert!(
                    a2.subtree_eq(alpha, &c.path),
                    "conflict {} touched alpha",
                    c.path
                );
                assert!(
                    b2.subtree_eq(beta, &c.path),
                    "conflict {} touched beta",
                    c.path
                );
            }
        }
        Mode::TwoWayResolved => {
            assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
            assert_eq!(a2, b2);
        }
        Mode::OneWayReplica => {
            assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
            assert_eq!(&a2, alpha, "alpha must not change");
            assert_eq!(b2, a2);
        }
        Mode::OneWaySafe => {
            assert_eq!(&a2, alpha, "alpha must not change");
            for (p, e) in alpha.iter() {
                if !in_conflict(&plan, p) {
                    assert_eq!(b2.get(p), Some(e), "{p} not propagated to beta");
                }
            }
            for (p, e) in beta.iter() {
                if ancestor.get(p) != Some(e) {
                    assert_eq!(b2.get(p), Some(e), "beta's edit at {p} lost");
                }
            }
        }
    }

    // (d) Idempotence: a second cycle on the result has nothing left to do.
    let again = reconcile(&ancestor2, &a2, &b2, mode).expect("second cycle must not halt");
    assert!(again.is_empty(), "second cycle not empty: {again:?}");
    let roots = |p: &Plan| {
        p.conflicts
            .iter()
            .map(|c| c.path.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(roots(&again), roots(&plan), "conflicts changed");
    true
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn two_way_safe(base in edits(), ea in edits(), eb in edits()) {
        let ancestor = build(&Snapshot::with_root(), &base);
        check_cycle(&ancestor, &build(&ancestor, &ea), &build(&ancestor, &eb), Mode::TwoWaySafe);
    }

    #[test]
    fn two_way_resolved(base in edits(), ea in edits(), eb in edits()) {
        let ancestor = build(&Snapshot::with_root(), &base);
        check_cycle(&ancestor, &build(&ancestor, &ea), &build(&ancestor, &eb), Mode::TwoWayResolved);
    }

    #[test]
    fn one_way_safe(base in edits(), ea in edits(), eb in edits()) {
        let ancestor = build(&Snapshot::with_root(), &base);
        check_cycle(&ancestor, &build(&ancestor, &ea), &build(&ancestor, &eb), Mode::OneWaySafe);
    }

    #[test]
    fn one_way_replica(base in edits(), ea in edits(), eb in edits()) {
        let ancestor = build(&Snapshot::with_root(), &base);
        check_cycle(&ancestor, &build(&ancestor, &ea), &build(&ancestor, &eb), Mode::OneWayReplica);
    }

    /// A scan sent as changes against the previous one rebuilds it exactly.
    #[test]
    fn changes_rebuild_the_newer_snapshot(base in edits(), e in edits()) {
        let older = build(&Snapshot::with_root(), &base);
        let newer = build(&older, &e);
        let mut rebuilt = older.clone();
        rebuilt.apply_changes(older.changes_to(&newer)).unwrap();
        prop_assert_eq!(&rebuilt, &newer);
        let mut back = newer.clone();
        back.apply_changes(newer.changes_to(&older)).unwrap();
        prop_assert_eq!(back, older);
    }

    /// (c) The same edits on both sides are never a conflict and move nothing.
    #[test]
    fn identical_edits_agree(base in edits(), e in edits(), mode_index in 0usize..4) {
        let mode = [Mode::TwoWaySafe, Mode::TwoWayResolved, Mode::OneWaySafe, Mode::OneWayReplica][mode_index];
        let ancestor = build(&Snapshot::with_root(), &base);
        let side = build(&ancestor, &e);
        if let Ok(plan) = reconcile(&ancestor, &side, &side, mode) {
            prop_assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
            prop_assert!(plan.to_alpha.is_empty() && plan.to_beta.is_empty(), "{:?}", plan);
            let next = ancestor_after(&ancestor, &plan, &plan.all_applied());
            prop_assert_eq!(next, side);
        }
    }

    /// Sessions that start with no ancestor (both sides pre-existing) never lose content in
    /// two-way-safe mode, and converge outside conflicts.
    #[test]
    fn fresh_session(ea in edits(), eb in edits()) {
        let root = Snapshot::with_root();
        check_cycle(&Snapshot::new(), &build(&root, &ea), &build(&root, &eb), Mode::TwoWaySafe);
    }

    /// Ops applied only in part still leave an ancestor from which the next cycles
    /// converge without losing an edit.
    #[test]
    fn partial_application_recovers(base in edits(), ea in edits(), eb in edits(), mask in prop::collection::vec(any::<bool>(), 64)) {
        let ancestor = build(&Snapshot::with_root(), &base);
        let alpha = build(&ancestor, &ea);
        let beta = build(&ancestor, &eb);
        let Ok(plan) = reconcile(&ancestor, &alpha, &beta, Mode::TwoWaySafe) else { return Ok(()); };
        // Apply a random subset, in order; an op whose re-check fails counts as failed.
        let mut a = alpha.clone();
        let mut b = beta.clone();
        let mut applied = cs_sync::Applied::default();
        for (i, op) in plan.to_alpha.iter().enumerate() {
            applied.to_alpha.push(mask[i % 64] && apply_to_snapshot(&mut a, op).is_ok());
        }
        for (i, op) in plan.to_beta.iter().enumerate() {
            applied.to_beta.push(mask[(i + 32) % 64] && apply_to_snapshot(&mut b, op).is_ok());
        }
        let next = ancestor_after(&ancestor, &plan, &applied);
        check_cycle(&next, &a, &b, Mode::TwoWaySafe);
    }

    /// Reconciling only around the dirty paths gives exactly the full plan, whatever else
    /// is marked dirty too; and it does look only there: with nothing dirty, nothing moves.
    #[test]
    fn dirty_reconcile_equals_the_full_one(
        base in prop::collection::vec(edit_or_problem(), 0..10),
        ea in prop::collection::vec(edit_or_problem(), 0..10),
        eb in prop::collection::vec(edit_or_problem(), 0..10),
        extra in prop::collection::vec(prop::collection::vec(0u8..3, 0..=3), 0..4),
        mode_index in 0usize..4,
    ) {
        let mode = [Mode::TwoWaySafe, Mode::TwoWayResolved, Mode::OneWaySafe, Mode::OneWayReplica][mode_index];
        // The ancestor never holds problems: a session records only what it synced.
        let ancestor = build(&Snapshot::with_root(), &base);
        let ancestor = {
            let mut a = ancestor.clone();
            for (p, e) in ancestor.iter() {
                if matches!(e, Entry::Problem { .. } | Entry::Symlink { .. }) && a.get(p).is_some() {
                    a.take_subtree(p);
                }
            }
            a
        };
        let alpha = build(&ancestor, &ea);
        let beta = build(&ancestor, &eb);
        let mut dirty = differing(&ancestor, &alpha, &beta);
        let precise = reconcile_dirty(&ancestor, &alpha, &beta, mode, &dirty);
        dirty.extend(extra.iter().map(|p| if p.is_empty() { RelPath::root() } else { rel(p) }));
        let padded = reconcile_dirty(&ancestor, &alpha, &beta, mode, &dirty);
        let full = reconcile(&ancestor, &alpha, &beta, mode);
        prop_assert_eq!(&precise, &full);
        prop_assert_eq!(&padded, &full);
        if let Ok(plan) = reconcile_dirty(&ancestor, &alpha, &beta, mode, &BTreeSet::new()) {
            prop_assert!(plan.is_empty() && plan.conflicts.is_empty() && plan.problems.is_empty(), "{:?}", plan);
        }
    }
}
