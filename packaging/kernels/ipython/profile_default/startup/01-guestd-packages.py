"""Packages installed while the kernel runs are importable in the next cell.

`!pip install x`, `%pip install x` and `pip install x` run as a command all write into
this kernel's site-packages. Python's import system caches directory listings and reads
`.pth` files only at startup, so before each cell this hook checks whether a
site-packages directory changed (one stat per directory) and, if it did, drops the
import caches and processes `.pth` files that appeared (editable installs, namespace
packages), so the new package imports without a kernel restart. A package that was
already imported keeps its old version until the kernel restarts, as in any Python.

Kernels run as root, while the venv belongs to the sandbox's default user (so that the
user's own `pip install` works): what a kernel's pip just installed is handed to the
venv's owner at the same moment, so the user can upgrade or uninstall it later.
"""


def _guestd_install_package_refresh():
    import importlib
    import os
    import site
    import sys

    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return

    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site:
        dirs.append(user_site)

    def stamp(d):
        try:
            return os.stat(d).st_mtime_ns
        except OSError:
            return None

    seen = {d: stamp(d) for d in dirs}
    bindir = os.path.dirname(sys.executable)

    def hand_over(d):
        """Gives root-owned entries of a user-owned directory to that user."""
        try:
            owner = os.stat(d)
        except OSError:
            return
        if os.geteuid() != 0 or owner.st_uid == 0:
            return
        uid, gid = owner.st_uid, owner.st_gid
        for name in os.listdir(d):
            top = os.path.join(d, name)
            try:
                if os.lstat(top).st_uid != 0:
                    continue
            except OSError:
                continue
            for root, subdirs, files in os.walk(top):
                for n in [root] + [os.path.join(root, x) for x in subdirs + files]:
                    try:
                        os.lchown(n, uid, gid)
                    except OSError:
                        pass
            if not os.path.isdir(top):
                try:
                    os.lchown(top, uid, gid)
                except OSError:
                    pass
    pth_seen = {
        d: set(n for n in os.listdir(d) if n.endswith(".pth")) if seen[d] else set()
        for d in dirs
    }

    def refresh(*_args, **_kwargs):
        changed = False
        for d in dirs:
            now = stamp(d)
            if now == seen[d]:
                continue
            seen[d] = now
            changed = True
            hand_over(d)
            hand_over(bindir)
            try:
                pths = set(n for n in os.listdir(d) if n.endswith(".pth"))
            except OSError:
                continue
            if pths - pth_seen[d] or d not in sys.path:
                # addsitedir appends d if missing and runs every .pth in it; paths
                # already on sys.path are not added twice.
                site.addsitedir(d)
            pth_seen[d] = pths
        if changed:
            importlib.invalidate_caches()

    shell.events.register("pre_run_cell", refresh)


try:
    _guestd_install_package_refresh()
finally:
    del _guestd_install_package_refresh
