/* cmd_compare.c — placeholder, filled in below */
#include "coordinator/commands.h"
int st_cmd_compare(int argc, char **argv) { (void)argc; (void)argv; return ST_EXIT_USAGE; }
