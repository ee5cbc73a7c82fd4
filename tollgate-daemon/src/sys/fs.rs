use std::path::Path;

use super::SysError;

/// The `f_type` magic of the filesystem holding `path` (`statfs(2)`).
pub fn fs_magic(path: &Path) -> Result<i64, SysError> {
    let c = super::cstring("path", &path.to_string_lossy()).map_err(|source| SysError {
        what: format!("statfs {}", path.display()),
        source,
    })?;
    // SAFETY: statfs on a valid C string into a zeroed struct (plain old data).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(SysError::last(format!("statfs {}", path.display())));
    }
    Ok(st.f_type as i64)
}

/// `mount -t <fstype> <fstype> <target>` with no flags or options.
pub fn mount(fstype: &str, target: &Path) -> Result<(), SysError> {
    let what = format!("mount -t {fstype} {fstype} {}", target.display());
    let werr = |source| SysError {
        what: what.clone(),
        source,
    };
    let t = super::cstring("path", &target.to_string_lossy()).map_err(werr)?;
    let f = super::cstring("fstype", fstype).map_err(werr)?;
    // SAFETY: valid C strings that outlive the call; a null data pointer means no options.
    let rc = unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(SysError::last(what));
    }
    Ok(())
}
