fn main() -> std::process::ExitCode {
    coordinator::cli_main()
}
