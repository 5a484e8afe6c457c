// Keeps strata_coordinator non-empty until its first module lands; removed with it.
namespace strata::coordinator {
int CoordinatorLibraryVersion() { return 1; }
}  // namespace strata::coordinator
