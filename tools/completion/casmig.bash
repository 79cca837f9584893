# bash completion for casmig (installed as share/bash-completion/completions/casmig)
_casmig_packages() {
    # Package ids: the legacy directories and the catalog's packages (casmig list), quietly.
    local store=${CASMIG_STORE:-/opt/pm/store} i
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == --store && $((i + 1)) -lt COMP_CWORD ]] && store=${COMP_WORDS[i + 1]}
    done
    {
        casmig --store "$store" --json list 2>/dev/null |
            sed -n 's/.*"id": *"\([^"]*\)".*/\1/p'
        find "$store" -mindepth 1 -maxdepth 1 -type d ! -name '.*' ! -name objects ! -name temp \
            ! -name migration ! -name packages -printf '%f\n' 2>/dev/null
    } | sort -u
}

_casmig() {
    local cur prev cmd i
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD - 1]}
    local commands="plan migrate convert status verify cutover cleanup rollback materialize add remove gc rebuild-catalog list show doctor help"
    local globals="--store --db -j --jobs --json --progress -q --quiet -v --verbose --config --lock-wait --metrics-file --version --help"
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
        --store | --db | -j | --jobs | --progress | --config | --lock-wait | --metrics-file) ((i++)) ;;
        -*) ;;
        *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $prev in
    --store | --config | --db | --metrics-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    --progress) COMPREPLY=($(compgen -W "auto always never" -- "$cur")); return ;;
    --link) COMPREPLY=($(compgen -W "copy reflink hardlink" -- "$cur")); return ;;
    --state) COMPREPLY=($(compgen -W "pending in_progress migrated verified failed rolled_back" -- "$cur")); return ;;
    -j | --jobs | --lock-wait | --limit | --time-budget | --io-limit | --sample | --journal) return ;;
    esac
    local opts=""
    case $cmd in
    "") COMPREPLY=($(compgen -W "$commands $globals" -- "$cur")); return ;;
    plan) opts="--limit --time-budget --io-limit --retry-failed" ;;
    migrate) opts="--limit --time-budget --io-limit --retry-failed --no-verify --compress --no-dictionary --no-space-check" ;;
    convert) opts="--compress --raw --no-dictionary --time-budget" ;;
    status) opts="--journal" ;;
    verify) opts="--objects --objects-only --sample" ;;
    cleanup | gc) opts="--dry-run" ;;
    rollback) opts="--no-space-check" ;;
    materialize) opts="--link" ;;
    rebuild-catalog) opts="--force" ;;
    list) opts="--state --verify-failed" ;;
    help) COMPREPLY=($(compgen -W "$commands" -- "$cur")); return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts $globals" -- "$cur"))
    elif [[ $cmd == add && $COMP_CWORD -gt 2 && ${COMP_WORDS[COMP_CWORD - 2]} == add ]]; then
        COMPREPLY=($(compgen -d -- "$cur"))   # add PKG DIR
    elif [[ $cmd == materialize && ${COMP_WORDS[COMP_CWORD - 2]} == materialize ]]; then
        COMPREPLY=($(compgen -d -- "$cur"))   # materialize PKG DEST
    else
        case $cmd in
        migrate | plan | verify | materialize | remove | show) COMPREPLY=($(compgen -W "$(_casmig_packages)" -- "$cur")) ;;
        esac
    fi
}
complete -F _casmig casmig
