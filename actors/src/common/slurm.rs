//! Launch under Slurm as under torchrun: a task started by `srun` (one task per GPU) gets the torchrun variables from
//! Slurm's own — `RANK` = `SLURM_PROCID`, `WORLD_SIZE` = `SLURM_NTASKS`, `LOCAL_RANK` = `SLURM_LOCALID`, and
//! `MASTER_ADDR` = the first host of `SLURM_JOB_NODELIST` — unless they are set already (an explicit launch wins).
//! Only inside a job step (`SLURM_STEP_ID` a number, i.e. started by `srun`): `lexflow` run directly in a batch script
//! is one process, not rank 0 of `SLURM_NTASKS` ranks waiting for the others. `docs/slurm/` has an sbatch example.

/// The variables to set (name, value, the Slurm variable it came from), given a lookup of the environment.
pub fn torchrun_vars_from_slurm(
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(&'static str, String, &'static str)>, String> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let in_step = get("SLURM_STEP_ID").is_some_and(|s| s.trim().parse::<u64>().is_ok());
    if !in_step || get("SLURM_PROCID").is_none() || get("SLURM_NTASKS").is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (ours, theirs) in [
        ("RANK", "SLURM_PROCID"),
        ("WORLD_SIZE", "SLURM_NTASKS"),
        ("LOCAL_RANK", "SLURM_LOCALID"),
    ] {
        if get(ours).is_none() {
            if let Some(v) = get(theirs) {
                out.push((ours, v, theirs));
            }
        }
    }
    if get("MASTER_ADDR").is_none() {
        if let Some(list) = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")) {
            let first = first_host(&list).map_err(|e| {
                format!("SLURM_JOB_NODELIST={list:?}: {e}; set MASTER_ADDR to rank 0's host")
            })?;
            out.push(("MASTER_ADDR", first, "SLURM_JOB_NODELIST"));
        }
    }
    Ok(out)
}

/// The first host of a Slurm host list: `gpu01`, `gpu[03-07,09],cpu1` → `gpu03`, `node[001-004]` → `node001`
/// (zero padding kept), `a[1,3]b[2-4]`-style products → the first of each bracket.
pub fn first_host(list: &str) -> Result<String, String> {
    // The first entry: up to the first comma outside brackets.
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or("unbalanced ']'")?,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    if depth != 0 && end == list.len() {
        return Err("unbalanced '['".into());
    }
    let entry = list[..end].trim();
    if entry.is_empty() {
        return Err("empty host list".into());
    }
    let mut host = String::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']').ok_or("unbalanced '['")? + open;
        let range = &rest[open + 1..close];
        let first = range.split(',').next().unwrap_or("");
        let lo = first.split('-').next().unwrap_or("").trim();
        if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("[{range}] is not a range of numbers"));
        }
        host.push_str(lo);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return Err("unbalanced ']'".into());
    }
    host.push_str(rest);
    Ok(host)
}

/// Sets the torchrun variables from Slurm's in this process (called first thing in `main`, before any thread
/// starts), logging each; a host list it cannot read is an error naming it.
pub fn apply_from_env() -> Result<(), String> {
    let vars = torchrun_vars_from_slurm(|k| std::env::var(k).ok())?;
    for (k, v, from) in vars {
        tracing::info!("Slurm launch: {k}={v} (from {from})");
        std::env::set_var(k, v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        torchrun_vars_from_slurm(|k| m.get(k).cloned())
            .map(|v| v.into_iter().map(|(k, v, _)| (k.to_string(), v)).collect())
    }

    #[test]
    fn host_lists_give_their_first_host() {
        assert_eq!(first_host("gpu01").unwrap(), "gpu01");
        assert_eq!(first_host("gpu[03-07,09],cpu1").unwrap(), "gpu03");
        assert_eq!(first_host("node[001-004]").unwrap(), "node001");
        assert_eq!(first_host("a[7,3]b[2-4]").unwrap(), "a7b2");
        assert_eq!(first_host("dgx-a100-[12-13]").unwrap(), "dgx-a100-12");
        for bad in ["", "gpu[01-02", "gpu01]", "gpu[x-y]"] {
            assert!(first_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_srun_task_gets_the_torchrun_variables() {
        let step = [
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[12-13]"),
        ];
        let got = vars(&step).unwrap();
        assert_eq!(
            got,
            [
                ("RANK", "5"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("MASTER_ADDR", "gpu12")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        // What the user set wins.
        let mut mine = step.to_vec();
        mine.extend([("MASTER_ADDR", "10.0.0.1"), ("RANK", "5")]);
        let got = vars(&mine).unwrap();
        assert!(
            got.iter().all(|(k, _)| k != "MASTER_ADDR" && k != "RANK"),
            "{got:?}"
        );
        // The batch script itself (no job step) is not a rank.
        let batch: Vec<_> = step
            .iter()
            .filter(|(k, _)| *k != "SLURM_STEP_ID")
            .cloned()
            .collect();
        assert!(vars(&batch).unwrap().is_empty());
        assert!(vars(&[
            ("SLURM_STEP_ID", "batch"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4")
        ])
        .unwrap()
        .is_empty());
        // An unreadable host list is an error naming it.
        let mut bad = step.to_vec();
        bad[4] = ("SLURM_JOB_NODELIST", "gpu[12-");
        let e = vars(&bad).unwrap_err();
        assert!(
            e.contains("SLURM_JOB_NODELIST") && e.contains("MASTER_ADDR"),
            "{e}"
        );
    }
}
