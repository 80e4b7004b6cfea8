//! A task's directory, `<task_root>/<agent>/<task id>/`: written when the
//! task starts (one file per issuer), removed when it has ended.

use super::*;

/// Writes each issuer's credential as `<root>/<agent>/<task id>/<issuer>.json`
/// (the directory 0700 and the files 0400, owned by the agent; `<agent>`
/// 0750 root-owned with the agent's group, so the agent cannot plant
/// anything in it). Returns the directory and each file.
pub(super) fn write_task_files(
    root: &Path,
    task: &TaskAttribution,
    owner: AgentOwner,
    issued: &BTreeMap<String, Issued>,
) -> Result<(PathBuf, BTreeMap<String, PathBuf>), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let agent_dir = root.join(&task.agent);
    crate::private_file::create_shared_dir(&agent_dir, 0o750, owner.gid)
        .map_err(|e| format!("{}: {e}", agent_dir.display()))?;
    let meta = std::fs::symlink_metadata(&agent_dir)
        .map_err(|e| format!("{}: {e}", agent_dir.display()))?;
    if !meta.is_dir()
        || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw()
    {
        return Err(format!(
            "{} is not a directory owned by keyturn's user; remove it and keyturn recreates it",
            agent_dir.display()
        ));
    }
    let dir = agent_dir.join(&task.task_id);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let chown = |p: &Path| -> Result<(), String> {
        if owner.uid.is_some() || owner.gid.is_some() {
            std::os::unix::fs::lchown(p, owner.uid, owner.gid)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    chown(&dir)?;
    let mut files = BTreeMap::new();
    for (issuer, cred) in issued {
        let path = dir.join(format!("{issuer}.json"));
        let mut doc = serde_json::Map::new();
        for (k, v) in &cred.public {
            doc.insert(k.clone(), v.clone().into());
        }
        doc.insert("task".into(), task.task_id.clone().into());
        doc.insert(
            "expires_at".into(),
            DateTime::<Utc>::from(cred.expires_at).to_rfc3339().into(),
        );
        for (k, v) in &cred.secret {
            let s = v
                .expose_str()
                .ok_or_else(|| format!("{issuer}: field {k} is not UTF-8"))?;
            doc.insert(k.clone(), s.into());
        }
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&doc).map_err(|e| e.to_string())?);
        // Clear the map's copies of the secrets too.
        for v in doc.values_mut() {
            if let serde_json::Value::String(s) = v {
                zeroize::Zeroize::zeroize(s);
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if owner.uid.is_some() || owner.gid.is_some() {
            std::os::unix::fs::fchown(&f, owner.uid, owner.gid)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        files.insert(issuer.clone(), path);
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok((dir, files))
}

/// Removes a task's directory `dir` (as recorded with the task) and the
/// files keyturn wrote in it. The path comes from keyturn's state: it must
/// be `<some root>/<agent>/<task id>` with the agent's directory keyturn's
/// own (as [`write_task_files`] made it), so that an altered store cannot
/// make keyturn remove anything else.
pub(super) fn remove_task_dir(dir: &Path, task: &TaskAttribution) -> Result<(), String> {
    let agent_dir = dir
        .parent()
        .filter(|_| dir.is_absolute() && dir.file_name() == Some(task.task_id.as_ref()))
        .filter(|a| a.file_name() == Some(task.agent.as_ref()))
        .ok_or_else(|| {
            format!(
                "{} is not <task_root>/{}/{}: not removed",
                dir.display(),
                task.agent,
                task.task_id
            )
        })?;
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    match std::fs::symlink_metadata(agent_dir) {
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", agent_dir.display())),
        Ok(m)
            if !m.is_dir()
                || std::os::unix::fs::MetadataExt::uid(&m) != nix::unistd::geteuid().as_raw() =>
        {
            return Err(format!(
                "{} is not a directory owned by keyturn's user: {} not removed",
                agent_dir.display(),
                dir.display()
            ));
        }
        Ok(_) => {}
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", dir.display())),
        Ok(_) => {}
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}
