# codetainer: root's login profile (installed as /root/.profile; /root/.bashrc sources it).
#
# `fly ssh console` opens an interactive root shell here; the last line hands the
# terminal to `codetainer attach`, which shows boot progress live, attaches to the agent's
# tmux session once it exists, and on a failed boot explains why and leaves a shell.
# Non-interactive use (`fly ssh console -C cmd`, sftp, scp) never attaches, nor does a
# shell already inside tmux. Set CODETAINER_NO_ATTACH=1 to get a plain root shell.

export CODETAINER_PROFILE_SOURCED=1
export LANG="${LANG:-en_US.UTF-8}"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

if [ -n "${BASH_VERSION:-}" ]; then
    PS1='\u@codetainer:\w\$ '
fi

case "$-" in
    *i*) ;;
    *) return 0 2>/dev/null || exit 0 ;;
esac
[ -t 0 ] && [ -t 1 ] || return 0
[ -z "${TMUX:-}" ] || return 0
[ -z "${CODETAINER_NO_ATTACH:-}" ] || return 0

exec codetainer attach
