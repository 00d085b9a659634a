#compdef pacs

_pacs_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PACS_COMPLETE=complete_zsh pacs)
}

compdef _pacs_completion pacs