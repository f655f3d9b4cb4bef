# Sourced by the command-line tests: sets $models to the folder holding stories260K where graft
# looks for it ($GRAFT_MODELS, then $shared/models, then the checkout's models/), or to "".
# Needs $shared and $root.
models=
IFS=: read -r -a search <<<"${GRAFT_MODELS:-}"
for dir in "${search[@]}" "$shared/models" "$root/models"; do
  if [[ -n $dir && -f $dir/stories260K/stories260K.gguf ]]; then
    models=$dir
    break
  fi
done
